"""BN folding and teacher → fake-quant student conversion (train/quant/{fold,convert}.py).

Expected quantizer counts are derived by hand from the architectures and the policy in DESIGN §3 /
convert.py's docstring (one quantizer per quantized tensor, input 8-bit affine, ReLU outputs unsigned,
residual sums quantized by their consumer, first/last layer at first_last_bits).
"""
from __future__ import annotations

import copy
import operator
from collections import Counter

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from core.errors import DFQFError
from toolkit import batch, randomize_bn, teacher
from train.quant.convert import QuantConfig, quantize_model
from train.quant.fold import fold_batch_norm
from train.quant.modules import ActQuantizer, QuantConv2d, QuantLinear, WeightQuantizer, quantization_disabled
from train.quant.spec import activation_spec, input_spec, weight_spec


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


RELU_MODULES = (nn.ReLU, nn.ReLU6)
RELU_FUNCS = {F.relu, torch.relu}
PASS_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
PASS_FUNCS = {operator.getitem, torch.flatten, F.pad}
PASS_METHODS = {"view", "reshape", "flatten"}
POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)
POOL_FUNCS = {F.adaptive_avg_pool2d}


def mod(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
    return gm.get_submodule(n.target) if n.op == "call_module" else None


def is_passthrough(gm: fx.GraphModule, n: fx.Node) -> bool:
    return (isinstance(mod(gm, n), PASS_MODULES) or (n.op == "call_function" and n.target in PASS_FUNCS)
            or (n.op == "call_method" and n.target in PASS_METHODS))


def source_quantizer(gm: fx.GraphModule, n: fx.Node) -> fx.Node | None:
    """The ActQuantizer node whose grid `n` is on, walking back through grid-preserving ops."""
    while True:
        if isinstance(mod(gm, n), ActQuantizer):
            return n
        if not is_passthrough(gm, n):
            return None
        n = n.args[0]


def nonneg(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Is the float value of node n provably >= 0 (from the graph's semantics, not from the quantizers)?"""
    m = mod(gm, n)
    if isinstance(m, RELU_MODULES) or (n.op == "call_function" and n.target in RELU_FUNCS) or \
            (n.op == "call_method" and n.target == "relu"):
        return True
    if isinstance(m, (ActQuantizer,) + POOL_MODULES) or is_passthrough(gm, n) or \
            (n.op == "call_function" and n.target in POOL_FUNCS):
        return nonneg(gm, n.args[0])
    return False  # placeholder, conv/linear accumulators, residual sums


def layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if isinstance(mod(gm, n), (QuantConv2d, QuantLinear))]


def aq_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if isinstance(mod(gm, n), ActQuantizer)]


def check_policy(t: nn.Module, student: fx.GraphModule, cfg: QuantConfig) -> list[ActQuantizer]:
    """Structural checks shared by every architecture; returns the activation quantizers."""
    # every conv/linear replaced, under its teacher name; nothing float left
    t_layers = {n: m for n, m in t.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for name, m in t_layers.items():
        q = student.get_submodule(name)
        assert isinstance(q, QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear), name
        assert q.weight.shape == m.weight.shape, name
    s_layers = [m for m in student.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(isinstance(m, (QuantConv2d, QuantLinear)) for m in s_layers)
    assert len(s_layers) == len(t_layers)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in student.modules())

    layers = layer_nodes(student)
    first, last = layers[0], layers[-1]
    assert isinstance(mod(student, first), QuantConv2d) and isinstance(mod(student, last), QuantLinear)

    # weights: first/last at first_last_bits, the rest at wbits, all per channel narrow symmetric
    for n in layers:
        m = mod(student, n)
        bits = cfg.first_last_bits if n in (first, last) else cfg.wbits
        assert m.weight_quantizer.spec == weight_spec(bits), n.target
        assert m.weight_quantizer.scale.shape == (m.weight.shape[0],)

    # activations: every ActQuantizer called exactly once, on distinct tensors
    aqs = aq_nodes(student)
    names = {name for name, m in student.named_modules() if isinstance(m, ActQuantizer)}
    assert Counter(n.target for n in aqs) == Counter(names)  # each module used once
    assert len({n.args[0] for n in aqs}) == len(aqs)  # one quantizer per tensor

    # the network input: exactly one placeholder, quantized 8-bit (first_last_bits) unsigned affine
    (ph,) = [n for n in student.graph.nodes if n.op == "placeholder"]
    (in_aq,) = [n for n in aqs if n.args[0] is ph]
    assert in_aq.target == "input_aq"
    assert mod(student, in_aq).spec == input_spec(cfg.first_last_bits)
    assert source_quantizer(student, first.args[0]) is in_aq

    # every conv/linear input is a quantized tensor; edge layers get first_last_bits, others abits
    feeds_edge = set()
    for n in layers:
        src = source_quantizer(student, n.args[0])
        assert src is not None, f"{n.target} consumes an unquantized tensor"
        if n in (first, last):
            feeds_edge.add(src)
    for n in aqs:
        q = mod(student, n)
        assert q.spec.bits == (cfg.first_last_bits if n in feeds_edge else cfg.abits), n.target
        if n is in_aq:
            continue
        # unsigned exactly when the quantized value is provably non-negative (after ReLU)
        assert q.spec == activation_spec(q.spec.bits, signed=not nonneg(student, n.args[0])), n.target
    assert any(not mod(student, n).spec.signed and nonneg(student, n.args[0]) and n is not in_aq for n in aqs)
    return [mod(student, n) for n in aqs]


# hand-derived: (number of ActQuantizers, how many of them signed)
#  tinynet:   input + stem relu + 2 blocks x (relu1, relu2) + pooled features = 7, none signed
#  resnet20:  input + stem relu + 9 blocks x 2 + pooled = 21, none signed
#  resnet18:  input + stem relu + 8 blocks x 2 + 3 downsample shortcuts (conv output, signed) + pooled = 22
#  mobilenet_v2: input, 35 ReLU6 outputs feeding a conv or the pool (f0, f1 dw, 16x(expand, dw), f18),
#    17 block outputs feeding the next conv (signed), 5 projections summed with a raw accumulator
#    (blocks 3, 5, 8, 12, 15: signed), pooled features  = 1 + 35 + 17 + 5 + 1 = 59, 22 signed
EXPECTED = {"tinynet": (7, 0), "resnet20": (21, 0), "resnet18": (22, 3), "mobilenet_v2": (59, 22)}


# ---------------------------------------------------------------------------------------------------
# BN folding
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["tinynet", "resnet20"])
def test_fold_batch_norm_preserves_outputs(arch: str) -> None:
    t = teacher(arch).train()  # the caller's mode must survive too
    before = copy.deepcopy(t.state_dict())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in t.modules())
    assert n_bn > 0
    gm = fold_batch_norm(t)
    # the input model is untouched
    assert t.training and state_equal(before, t.state_dict())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in t.modules()) == n_bn
    # no BatchNorm left, every conv carries the folded bias
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.BatchNorm2d)
                   for n in gm.graph.nodes)
    convs = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in t.modules())
    assert all(c.bias is not None for c in convs)
    x = batch(arch, 4)
    with torch.no_grad():
        want = t.eval()(x)
        got = gm(x)
    assert (got - want).abs().max().item() < 1e-4
    assert want.abs().max().item() > 1e-2  # not a trivially zero network


def test_fold_batch_norm_formula_on_one_layer() -> None:
    """W' = W * g/sqrt(v+eps), b' = (b - mean) * g/sqrt(v+eps) + beta, checked per channel."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4, eps=1e-3)
    randomize_bn(nn.Sequential(bn), seed=3)
    gm = fold_batch_norm(nn.Sequential(conv, bn).eval())
    (fc,) = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(fc.weight, conv.weight * k[:, None, None, None], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fc.bias, (conv.bias - bn.running_mean) * k + bn.bias, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# quantize_model: structure and policy
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,cfg", [
    ("tinynet", QuantConfig()),
    ("tinynet", QuantConfig(wbits=3, abits=5, first_last_bits=6)),
    ("resnet20", QuantConfig()),
    ("resnet20", QuantConfig(wbits=2, abits=3, first_last_bits=8)),
    ("resnet18", QuantConfig(wbits=3, abits=5, first_last_bits=8)),
    ("mobilenet_v2", QuantConfig(wbits=3, abits=5, first_last_bits=8)),
])
def test_quantize_model_structure_and_float_equivalence(arch: str, cfg: QuantConfig) -> None:
    t = teacher(arch)
    before = copy.deepcopy(t.state_dict())
    student = quantize_model(t, cfg)
    assert state_equal(before, t.state_dict())  # the teacher is not modified
    assert not student.training

    aqs = check_policy(t, student, cfg)
    n_aq, n_signed = EXPECTED[arch]
    assert len(aqs) == n_aq
    assert sum(q.spec.signed for q in aqs) == n_signed
    # the only quantizers at first_last_bits are the network input and the last layer's input
    if cfg.first_last_bits != cfg.abits:
        assert sum(q.spec.bits == cfg.first_last_bits for q in aqs) == 2

    x = batch(arch, 1 if arch in ("resnet18", "mobilenet_v2") else 4)
    with torch.no_grad():
        want = t(x)
        with quantization_disabled(student):
            got = student(x)
        assert all(q.enabled for q in student.modules() if isinstance(q, (ActQuantizer, WeightQuantizer)))
        quantized = student(x)  # enabled again after the context (scales still 1.0: coarse grid)
    assert got.shape == want.shape
    assert max_rel_diff(got, want) < 1e-4
    assert not torch.allclose(quantized, want, atol=1e-3)


def test_tinynet_identity_shortcut_shares_quantizer() -> None:
    student = quantize_model(teacher("tinynet"), QuantConfig())
    g = {n.target: n for n in student.graph.nodes if n.op == "call_module"}
    conv1 = g["layer1.0.conv1"]
    aq = conv1.args[0]
    assert aq.op == "call_module" and aq.target == "relu_aq" and isinstance(mod(student, aq), ActQuantizer)
    assert aq.args[0] is g["relu"]  # the stem ReLU output
    (add,) = [n for n in student.graph.nodes
              if n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add)
              and any(u.op == "call_module" and u.target == "layer1.0.relu2" for u in n.users)]
    # the residual add reads the same quantized tensor as conv1, plus the raw conv2 accumulator
    assert set(add.args) == {aq, g["layer1.0.conv2"]}
    assert sum(1 for n in student.graph.nodes if n.args and n.args[0] is g["relu"] and n.op == "call_module"
               and isinstance(mod(student, n), ActQuantizer)) == 1


def test_overrides_change_one_quantizer() -> None:
    cfg = QuantConfig(overrides={"layer1.0.conv1": 2, "relu_aq": 6, "input_aq": 7})
    student = quantize_model(teacher("tinynet"), cfg)
    assert student.get_submodule("layer1.0.conv1").weight_quantizer.spec.bits == 2
    assert student.get_submodule("layer1.0.conv2").weight_quantizer.spec.bits == cfg.wbits
    assert student.get_submodule("relu_aq").spec.bits == 6
    assert student.get_submodule("input_aq").spec == input_spec(7)
    assert student.get_submodule("layer1_0_relu1_aq").spec.bits == cfg.abits


# ---------------------------------------------------------------------------------------------------
# unsupported layers and invalid configs
# ---------------------------------------------------------------------------------------------------
class SigmoidNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.Sigmoid()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.act(self.conv(x)), 1), 1))


class LayerNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.flatten = nn.Flatten(1)
        self.norm = nn.LayerNorm(4 * 6 * 6)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        return self.fc(self.norm(self.flatten(self.conv(x))))


class FunctionalSigmoidNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.sigmoid(self.conv(x)), 1), 1))


@pytest.mark.parametrize("model,bad", [(SigmoidNet, "Sigmoid"), (LayerNormNet, "LayerNorm"),
                                       (FunctionalSigmoidNet, "sigmoid")])
def test_unsupported_layer_raises_with_supported_list(model, bad: str) -> None:
    with pytest.raises(DFQFError) as e:
        quantize_model(model().eval(), QuantConfig())
    msg = str(e.value)
    assert bad in msg
    for supported in ("Conv2d", "Linear", "ReLU", "MaxPool2d", "AdaptiveAvgPool2d"):
        assert supported in msg


def test_model_without_layers_raises() -> None:
    with pytest.raises(DFQFError):
        quantize_model(nn.Sequential(nn.ReLU(), nn.Flatten()), QuantConfig())


@pytest.mark.parametrize("field", ["wbits", "abits", "first_last_bits"])
@pytest.mark.parametrize("bits", [1, 9, 0, -4, 4.0, "4"])
def test_quant_config_rejects_bits(field: str, bits) -> None:
    with pytest.raises(DFQFError):
        QuantConfig(**{field: bits})


@pytest.mark.parametrize("bits", [1, 9])
def test_quant_config_rejects_override_bits(bits: int) -> None:
    with pytest.raises(DFQFError):
        QuantConfig(overrides={"conv1": bits})


def test_quant_config_accepts_range_ends() -> None:
    for b in (2, 8):
        cfg = QuantConfig(wbits=b, abits=b, first_last_bits=b, overrides={"x": b}, residual_bits=b)
        assert cfg.to_dict() == {"wbits": b, "abits": b, "first_last_bits": b, "overrides": {"x": b},
                                 "residual_bits": b, "protocol": "integer"}
