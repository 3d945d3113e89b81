"""DFQ (Nagel et al., ICCV 2019): cross-layer equalization, bias correction and BN-based ranges.

All three are data-free: they use only the weights and the BN statistics of the teacher.
1. Cross-layer equalization (CLE): for conv pairs A -> ReLU -> B, scale output channel i of A by 1/s_i and
   input channel i of B by s_i with s_i = sqrt(r_A,i / r_B,i) (r = max |w| of that channel), which leaves
   the float function unchanged (ReLU is positively homogeneous) and equalizes the per-channel ranges.
2. Activation ranges from BN statistics: the quantizer after a BN'd conv (and ReLU) sees per channel
   N(beta, gamma^2) (clipped); its range is [min(beta - n*gamma), max(beta + n*gamma)], n = 6 in the paper.
3. Bias correction: quantizing W adds eps = W_q - W; its expected effect on the output,
   eps @ E[x], is subtracted from the bias, with E[x] from the propagated BN statistics.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..quant.calibrate import calibrate_weights, set_qparams
from ..quant.convert import QuantConfig, quantize_model
from ..quant.fold import conv_bn_pairs, fold_batch_norm, trace
from ..quant.modules import ActQuantizer, QuantConv2d, QuantLinear
from .gaussian_stats import Gaussian, propagate

RANGE_STDS = 6.0


def bn_output_stats(teacher: nn.Module) -> dict[str, Gaussian]:
    """conv module name -> N(beta, gamma^2) of its BN'd output, read from the teacher's BN layers."""
    gm = trace(teacher)
    stats = {}
    for conv_name, bn_name in conv_bn_pairs(gm):
        bn = gm.get_submodule(bn_name)
        stats[conv_name] = Gaussian(bn.bias.detach().clone(), bn.weight.detach().clone() ** 2)
    return stats


def equalization_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(A, B) conv names with A -> ReLU -> B, where B is the only consumer and groups == 1 for both."""
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.Conv2d):
            continue
        if len(node.users) != 1:
            continue
        act = next(iter(node.users))
        if not (act.op == "call_module" and isinstance(gm.get_submodule(act.target), nn.ReLU)) or len(act.users) != 1:
            continue
        nxt = next(iter(act.users))
        if nxt.op == "call_module" and isinstance(gm.get_submodule(nxt.target), nn.Conv2d):
            a, b = gm.get_submodule(node.target), gm.get_submodule(nxt.target)
            if a.groups == 1 and b.groups == 1:
                pairs.append((node.target, nxt.target))
    return pairs


@torch.no_grad()
def cross_layer_equalize(folded: fx.GraphModule, stats: dict[str, Gaussian], iterations: int = 10
                         ) -> tuple[fx.GraphModule, dict[str, Gaussian]]:
    """Return an equalized copy of a BN-folded graph and the correspondingly rescaled output stats."""
    import copy

    gm = copy.deepcopy(folded)
    stats = {k: Gaussian(v.mean.clone(), v.var.clone()) for k, v in stats.items()}
    for _ in range(iterations):
        for a_name, b_name in equalization_pairs(gm):
            a, b = gm.get_submodule(a_name), gm.get_submodule(b_name)
            r_a = a.weight.abs().amax(dim=(1, 2, 3))
            r_b = b.weight.abs().amax(dim=(0, 2, 3))
            s = torch.sqrt(r_a / r_b.clamp(min=1e-12)).clamp(min=1e-6)
            s = torch.where((r_a > 0) & (r_b > 0), s, torch.ones_like(s))
            a.weight.div_(s.view(-1, 1, 1, 1))
            if a.bias is not None:
                a.bias.div_(s)
            b.weight.mul_(s.view(1, -1, 1, 1))
            if a_name in stats:
                stats[a_name] = Gaussian(stats[a_name].mean / s, stats[a_name].var / s**2)
    return gm, stats


def input_gaussian(mean: tuple[float, ...], std: tuple[float, ...]) -> Gaussian:
    """Normalized pixels, with pixels assumed uniform on [0, 1] (mean 1/2, variance 1/12)."""
    m, s = torch.tensor(mean), torch.tensor(std)
    return Gaussian((0.5 - m) / s, torch.full_like(m, 1 / 12) / s**2)


@torch.no_grad()
def set_ranges_from_stats(student: fx.GraphModule, at_quantizer: dict[str, Gaussian],
                          input_range: tuple[torch.Tensor, torch.Tensor], n_std: float = RANGE_STDS) -> None:
    for name, q in student.named_modules():
        if not isinstance(q, ActQuantizer):
            continue
        if name == "input_aq":
            set_qparams(q, *input_range)
            continue
        g = at_quantizer[name]
        lo, hi = (g.mean - n_std * g.std).min(), (g.mean + n_std * g.std).max()
        if not q.spec.signed:
            lo = torch.clamp(lo, min=0.0)
        set_qparams(q, lo, hi)


@torch.no_grad()
def correct_bias(student: fx.GraphModule, at_input: dict[str, Gaussian]) -> int:
    """Subtract the expected output shift of weight quantization; returns the number of layers corrected."""
    corrected = 0
    for name, m in student.named_modules():
        if not isinstance(m, (QuantConv2d, QuantLinear)) or name not in at_input or at_input[name] is None:
            continue
        eps = m.weight_quantizer(m.weight) - m.weight
        ex = at_input[name].mean
        if isinstance(m, QuantConv2d):
            eps = eps.sum(dim=(2, 3))  # [O, I/groups]
            if m.groups == 1:
                shift = eps @ ex
            elif m.groups == m.in_channels and m.in_channels == m.out_channels:
                shift = eps[:, 0] * ex
            else:
                continue
        else:
            shift = eps @ ex
        m.bias.sub_(shift)
        corrected += 1
    return corrected


def dfq_student(teacher: nn.Module, config: QuantConfig, mean: tuple[float, ...], std: tuple[float, ...],
                equalize: bool = True, bias_correction: bool = True) -> tuple[fx.GraphModule, dict]:
    stats = bn_output_stats(teacher)
    folded = fold_batch_norm(teacher)
    if equalize:
        folded, stats = cross_layer_equalize(folded, stats)
    student = quantize_model(folded, config)
    calibrate_weights(student, "minmax")
    inp = input_gaussian(mean, std)
    prop = propagate(student, stats, inp)
    m, s = torch.tensor(mean), torch.tensor(std)
    set_ranges_from_stats(student, prop.at_quantizer, (((0 - m) / s).min(), ((1 - m) / s).max()))
    n_corrected = correct_bias(student, prop.at_input) if bias_correction else 0
    return student, {"equalized_pairs": len(equalization_pairs(folded)) if equalize else 0,
                     "bias_corrected_layers": n_corrected, "range_stds": RANGE_STDS}
