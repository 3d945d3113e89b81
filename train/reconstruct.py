"""Block reconstruction of a fake-quant student against its teacher (BRECQ, Li et al. 2021; QDrop, Wei et al.
2022; data-free as in Genie, Jeon et al. 2023), on synthetic images.

The student is cut at its residual-stream quantizers (activation quantizers with more than one consumer: a
block's input feeds both its convs and its shortcut); block k runs from one cut to the next, the last block
to the logits. Blocks are reconstructed in order, each on its own:

- its input is the student's own (already reconstructed) pre-quantizer value at the cut, cached for every
  image, quantized by the cut's quantizer inside the block;
- its weights round by learned AdaRound variables (Nagel et al. 2020): w_q = s * clamp(floor(w/s) + h(V)),
  h = a rectified sigmoid in [0, 1] started at frac(w/s), pushed to 0 or 1 by the regularizer
  lam * sum(1 - |2h - 1|^beta) with beta annealed from 20 to 2 after a warm-up; at the end the hard
  rounding floor(w/s) + [V >= 0] is written into the weight (so the student's own round-half-up quantizer,
  and the integer graph, reproduce exactly those codes);
- its activation step sizes (LSQ) are learned too;
- QDrop: each of its activation quantizers passes a random half of the elements unquantized, so the block
  learns with the quantization noise of its input and its neighbours partly off;
- loss: mean squared error to the teacher's value at the block's output cut (the logits for the last block).
Weight step sizes and biases stay as calibrated. `reconstruct` changes the student in place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from .feature_kd import TeacherFeatures
from .quant.fold import trace
from .quant.modules import ActQuantizer, QuantConv2d, QuantLinear, WeightQuantizer, keep_steps_positive

ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch


@dataclass(frozen=True)
class ReconstructionConfig:
    steps: int = 400  # per block
    batch: int = 32
    round_lr: float = 1e-2
    scale_lr: float = 4e-5
    round_weight: float = 0.01  # lam of the rounding regularizer (per weight, summed)
    warmup: float = 0.2  # fraction of the steps before the regularizer starts
    beta: tuple[float, float] = (20.0, 2.0)
    qdrop: float = 0.5  # probability an activation element skips quantization during reconstruction
    seed: int = 0


class AdaRoundWeight(nn.Module):
    """Stands in for a WeightQuantizer during reconstruction: learned rounding of a fixed weight."""

    def __init__(self, q: WeightQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        self.q = q
        s = self.scale(weight)
        rest = weight.detach() / s - torch.floor(weight.detach() / s)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(v) = rest
        self.register_buffer("floor", torch.floor(weight.detach() / s))

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        return self.q.scale.detach().reshape(-1, *([1] * (w.dim() - 1)))

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        spec = self.q.spec
        return self.scale(w) * torch.clamp(self.floor + self.h(), spec.qmin, spec.qmax)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def hard_weight(self) -> torch.Tensor:
        """The weight whose round-half-up quantization gives the learned hard codes (exactly s * code)."""
        spec = self.q.spec
        code = torch.clamp(self.floor + (self.v >= 0).to(self.floor.dtype), spec.qmin, spec.qmax)
        return self.scale(self.floor) * code


def cuts(student: fx.GraphModule) -> list[fx.Node]:
    """The residual-stream quantizer nodes (an ActQuantizer output with more than one consumer), in order."""
    return [n for n in student.graph.nodes if n.op == "call_module"
            and isinstance(student.get_submodule(n.target), ActQuantizer) and len(n.users) > 1]


def block_module(student: fx.GraphModule, start: fx.Node, end: fx.Node) -> fx.GraphModule:
    """The subgraph computing `end` from `start` (its one input), sharing the student's modules."""
    needed: set[fx.Node] = set()
    stack = [end]
    while stack:
        n = stack.pop()
        if n in needed or n is start:
            continue
        if n.op == "placeholder":
            raise ValueError(f"{end.name} depends on the network input past {start.name}: not a block")
        needed.add(n)
        stack.extend(n.all_input_nodes)
    g = fx.Graph()
    env = {start: g.placeholder("x")}
    for n in student.graph.nodes:
        if n in needed:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[end])
    return fx.GraphModule(student, g)


def _record(student: nn.Module, node: fx.Node | None, images: torch.Tensor, batch: int) -> torch.Tensor:
    """The student's value at `node` (the network input when None) for every image, in batches."""
    if node is None:
        return images
    module = student.get_submodule(node.target)
    out: list[torch.Tensor] = []
    hook = module.register_forward_pre_hook(lambda _m, args: out.append(args[0].detach()))
    try:
        with torch.no_grad():
            for x in images.split(batch):
                student(x)
    finally:
        hook.remove()
    return torch.cat(out)


def _qdrop(p: float, g: torch.Generator) -> Callable:
    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(out.shape, generator=g) < p
        return torch.where(keep, args[0], out)
    return hook


def reconstruct(student: fx.GraphModule, teacher: nn.Module, images: torch.Tensor,
                cfg: ReconstructionConfig = ReconstructionConfig(),
                log: Callable[[str], None] = lambda m: None) -> list[dict[str, float]]:
    """Reconstruct every block of `student` (in place) on normalized `images`; returns per block its name,
    the loss before and after (MSE to the teacher), the share of weights whose rounding changed, and whether
    the block kept its calibration (when reconstruction would have made it worse)."""
    student.eval()
    cut_nodes = cuts(student)
    output = next(n for n in student.graph.nodes if n.op == "output").args[0]
    input_node = next(n for n in student.graph.nodes if n.op == "placeholder")
    ends = [*cut_nodes, output]
    names = [c.name.removesuffix("_aq") for c in cut_nodes]  # the teacher nodes at the cuts
    teacher_gm = TeacherFeatures(trace(teacher), names)
    with torch.no_grad():
        outs = [teacher_gm(x) for x in images.split(cfg.batch)]
    targets = [torch.cat([o[1][i] for o in outs]) for i in range(len(names))] + [torch.cat([o[0] for o in outs])]
    g = torch.Generator().manual_seed(cfg.seed)
    report = []
    for k, end in enumerate(ends):
        start = input_node if k == 0 else cut_nodes[k - 1].args[0]  # pre-quantizer value: the cut quantizes it
        block = block_module(student, start, end)
        inputs = _record(student, None if k == 0 else cut_nodes[k - 1], images, cfg.batch)
        report.append(_reconstruct_block(block, inputs, targets[k], cfg, g))
        report[-1]["block"] = end.name
        log(f"block {end.name}: mse {report[-1]['mse_before']:.4g} -> {report[-1]['mse_after']:.4g}, "
            f"{100 * report[-1]['flipped']:.1f}% of the rounding changed")
    return report


def _reconstruct_block(block: fx.GraphModule, inputs: torch.Tensor, target: torch.Tensor,
                       cfg: ReconstructionConfig, g: torch.Generator) -> dict[str, float]:
    layers = [m for m in block.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    acts = [m for m in block.modules() if isinstance(m, ActQuantizer)]
    rounders = [AdaRoundWeight(m.weight_quantizer, m.weight) for m in layers]
    saved = [m.weight_quantizer for m in layers]
    n = len(inputs)

    def mse() -> float:
        with torch.no_grad():
            return float(sum(((block(inputs[i:i + 256]) - target[i:i + 256]) ** 2).sum()
                             for i in range(0, n, 256)) / target.numel())

    before = mse()
    kept = {id(t): t.detach().clone() for m in layers for t in (m.weight,)} | {id(a.scale): a.scale.detach().clone()
                                                                             for a in acts}
    params = [{"params": [r.v for r in rounders], "lr": cfg.round_lr}]
    # the quantizer of the block's input (the cut, or the network input) was reconstructed with the block
    # before it: only the block's own step sizes are learned
    x = next(nd for nd in block.graph.nodes if nd.op == "placeholder")
    at_input = {block.get_submodule(u.target) for u in x.users if u.op == "call_module"}
    inner = [a for a in acts if a not in at_input]
    if inner:
        params.append({"params": [a.scale for a in inner], "lr": cfg.scale_lr})
    opt = torch.optim.Adam(params)
    hooks = [a.register_forward_hook(_qdrop(cfg.qdrop, g)) for a in acts] if cfg.qdrop > 0 else []
    for m, r in zip(layers, rounders):
        m.weight_quantizer = r
    try:
        warm = int(cfg.warmup * cfg.steps)
        for step in range(cfg.steps):
            idx = torch.randint(0, n, (min(cfg.batch, n),), generator=g)
            loss = ((block(inputs[idx]) - target[idx]) ** 2).mean()
            if step >= warm and rounders:
                t = (step - warm) / max(1, cfg.steps - warm)
                beta = cfg.beta[1] + 0.5 * (cfg.beta[0] - cfg.beta[1]) * (1 + math.cos(math.pi * t))
                loss = loss + cfg.round_weight * sum(r.regularizer(beta) for r in rounders) / max(
                    1, sum(r.v.numel() for r in rounders))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            keep_steps_positive(block)
    finally:
        for h in hooks:
            h.remove()
        for m, q in zip(layers, saved):
            m.weight_quantizer = q
    flipped = total = 0
    with torch.no_grad():
        for m, r in zip(layers, rounders):
            hard = r.hard_weight()
            nearest = torch.floor(m.weight / r.scale(m.weight) + 0.5)
            flipped += int((torch.round(hard / r.scale(m.weight)) != nearest).sum())
            total += hard.numel()
            m.weight.copy_(hard)
    after = mse()
    if after > before:  # a block that reconstruction made worse (too few steps) keeps its calibration
        with torch.no_grad():
            for t in [m.weight for m in layers] + [a.scale for a in acts]:
                t.copy_(kept[id(t)])
        return {"mse_before": before, "mse_after": before, "flipped": 0.0, "kept_calibration": True}
    return {"mse_before": before, "mse_after": after, "flipped": flipped / max(total, 1), "kept_calibration": False}
