"""Before/Expected tests of the two graph transformations: a student (before) and the integer graph it
lowers to (expected), and an integer graph and the Relax ops its activations flow through (expected)."""
from __future__ import annotations

import torch
from torch import nn
from tvm import relax

from lower import tvm_build as tb
from lower.integerize import integerize
from lower.schedules import SCHEDULE_SETS
from toolkit import GraphMaker
from train.quant.calibrate import calibrate
from train.quant.convert import QuantConfig, quantize_model


class ResidualNet(nn.Module):
    """Before: conv-BN-ReLU, a residual conv-BN + add + ReLU, global average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.relu, self.pool, self.fc = nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.bn1(self.conv1(x)))
        b = self.relu(self.bn2(self.conv2(a)) + a)
        return self.fc(torch.flatten(self.pool(b), 1))


def test_integerize_before_expected() -> None:
    torch.manual_seed(0)
    student = quantize_model(ResidualNet().eval(), QuantConfig(wbits=4, abits=4, first_last_bits=8))
    calibrate(student, [torch.randn(8, 3, 6, 6)], "minmax")
    g = integerize(student, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (3, 6, 6))
    got = [(n.op, n.name, n.inputs, g.tensors[n.name].dtype, g.tensors[n.name].bits, g.tensors[n.name].shape)
           for n in g.nodes]
    expected = [
        # the 8-bit affine input: a lookup table from raw pixels (normalization folded in)
        ("quantize_input", "input_aq", ("pixels",), "uint8", 8, (3, 6, 6)),
        ("conv2d", "conv1", ("input_aq",), "int32", 32, (4, 6, 6)),  # BN folded, first layer 8-bit
        ("requantize", "relu_aq", ("conv1",), "uint8", 4, (4, 6, 6)),  # bias + ReLU + 4-bit rounding: one op
        ("conv2d", "conv2", ("relu_aq",), "int32", 32, (4, 6, 6)),
        ("requantize", "relu_1_aq", ("conv2", "relu_aq"), "uint8", 4, (4, 6, 6)),  # residual add rounded once
        ("sum_pool2d", "pool", ("relu_1_aq",), "int32", 32, (4, 1, 1)),  # 1/HW goes into the next multiplier
        ("requantize", "pool_aq", ("pool",), "uint8", 8, (4, 1, 1)),  # feeds the last layer: 8-bit
        ("reshape", "flatten", ("pool_aq",), "uint8", 8, (4,)),
        ("dense", "fc", ("flatten",), "int32", 32, (2,)),  # int32 logits
    ]
    assert got == expected
    weight_bits = {n.name: n.attrs["weight_bits"] for n in g.nodes if n.op in ("conv2d", "dense")}
    assert weight_bits == {"conv1": 8, "conv2": 4, "fc": 8}
    rq = {n.name: n.attrs for n in g.nodes if n.op == "requantize"}
    assert rq["relu_aq"]["qmin"] == rq["relu_aq"]["output_zero_point"] == 0 and rq["relu_aq"]["qmax"] == 15
    assert rq["relu_1_aq"]["input_zero_points"] == [0, 0]
    assert g.node("conv1").attrs["input_zero_point"] == g.tensors["input_aq"].zero_point


def _activation_path(mod) -> list[tuple[str, str]]:
    """(op or kernel name, dtype) of every binding of main whose shape has the batch n: the activation path."""
    out = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            ty = b.var.ty
            if isinstance(b.value, relax.Call) and getattr(ty, "shape", None) is not None and "n" in str(ty.shape):
                name = b.value.op.name.removeprefix("relax.")
                out.append((b.value.args[0].name_hint if name == "call_tir" else name, str(ty.dtype)))
    return out


def _graph():
    """Before: q -> conv c0 -> requantize a (ReLU) -> conv c1 + residual a -> requantize y (ReLU) -> global
    sum pool -> requantize -> reshape -> dense."""
    m = GraphMaker(0)
    a = m.requantize("a", [m.conv("c0", "q", 16)], relu=True)
    m.requantize("y", [m.conv("c1", a, 16), a], relu=True)
    m.add("sum_pool2d", "p", ["y"], {"kernel": [8, 8], "stride": [8, 8]}, dtype="int32")
    m.requantize("pq", ["p"], per_channel=False)
    m.add("reshape", "f", ["pq"], {"shape": [16]})
    m.dense("fc", "f", 5)
    return m.graph()


LUT = [("astype", "int32"), ("add", "int32"), ("take", "uint8")]  # lut[c * 256 + pixel]
REQUANTIZE_TAIL = [("add", "int64"), ("add", "int64"), ("right_shift", "int64"), ("add", "int64"), ("clip", "int64"),
                   ("astype", "uint8")]  # + offset, + rounding, >> n, + zp_out, clamp, store
DENSE = [("permute_dims", "uint8"), ("reshape", "uint8"), ("astype", "int16"), ("subtract", "int16"),
         ("matmul", "int32"), ("add", "int32")]
POOL = [("sum_pool2d", "int32"), ("astype", "int64"), ("subtract", "int64"), ("multiply", "int64"), *REQUANTIZE_TAIL]


def test_relax_build_before_expected_with_vnni_kernels() -> None:
    """Each conv and its requantize (the residual term too) is one hand-scheduled kernel; the input channels
    of the first conv are padded 3 -> 4; the dense layer is the conv kernel on a 1x1 image (its 5 outputs
    padded to one 16-channel block, sliced back); the global sum pool is the pooling kernel; the rest are plain
    Relax ops."""
    dense = [("permute_dims", "uint8"), ("reshape", "uint8"), ("reshape", "uint8"), ("fc_conv2d_vnni", "int32"),
             ("strided_slice", "int32"), ("add", "int32"), ("reshape", "int32")]
    expected = [*LUT, ("nn.pad", "uint8"), ("c0_conv2d_vnni", "uint8"), ("c1_conv2d_vnni", "uint8"),
                ("p_pool", "int32"), *POOL[1:], *dense]
    assert _activation_path(tb.build_relax(_graph(), SCHEDULE_SETS["x86_vnni"])) == expected


def test_relax_build_before_expected_with_default_loops() -> None:
    """Without a schedule set: (x - zp) in int16, an int32 Relax conv2d + bias, then the int64 requantize."""
    conv = [("astype", "int16"), ("subtract", "int16"), ("nn.conv2d", "int32"), ("add", "int32")]
    first_term = [("astype", "int64"), ("multiply", "int64")]
    residual = [("astype", "int64"), ("subtract", "int64"), ("multiply", "int64"), ("add", "int64")]
    expected = [*LUT, *conv, *first_term, *REQUANTIZE_TAIL, *conv, *first_term, *residual, *REQUANTIZE_TAIL, *POOL,
                *DENSE]
    assert _activation_path(tb.build_relax(_graph(), None)) == expected
