"""What the tests share: the one integer-graph builder (`GraphMaker`), the exactness check of compiled graphs,
small reference graphs, seeded float teachers, the tiny calibrated student (STYLE §11) and in-process CLI runs."""
from __future__ import annotations

import importlib
import math
from fractions import Fraction

import numpy as np
import torch
from torch import nn

from lower.graph import IntGraph, Node, TensorInfo
from lower.params import pack_params
from lower.reference import EXECUTORS, run_graph
from train.models import build_model
from train.models.tiny import TinyNet
from train.quant.primitives import dyadic_multiplier, round_half_up_np

H, W, C = 8, 8, 3
BATCHES = (1, 3)
MEAN, STD = np.array([0.49, 0.48, 0.45]), np.array([0.25, 0.24, 0.26])


class GraphMaker:
    """Builds a valid IntGraph node by node on sample pixels; each node's shape and sample values come from
    the NumPy reference. Two kinds of numbers: random ones (`conv`, `dense`, `requantize`: any weights and
    dyadic multipliers, for exactness tests) and calibrated ones (`normalized_input`, `linear`,
    `calibrated_requantize`: each activation scale covers the 99.9th percentile of its real values, the conv
    biases are real and added by the next requantize, as `lower.integerize` does: for ONNX agreement tests).

    By default the graph starts with a quantize_input node "q" of a random lookup table (`out_dtype`,
    `zero_point`); `quantize_input=False` leaves the first node to the caller."""

    def __init__(self, seed: int = 0, out_dtype: str = "uint8", zero_point: int = 5, pixels: np.ndarray | None = None,
                 quantize_input: bool = True) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[Node] = []
        self.tensors: dict[str, TensorInfo] = {}
        self.pixels = self.rng.integers(0, 256, (2, H, W, C), dtype=np.uint8) if pixels is None else pixels
        self.sample = {"px": self.pixels}
        self.biases: dict[str, np.ndarray] = {}  # real conv biases, added by the requantize that reads the conv
        if quantize_input:
            info = TensorInfo((C, H, W), out_dtype, 8, out_dtype == "int8", (0.02,), zero_point)
            lo, hi = info.qrange
            lut = self.rng.integers(lo, hi + 1, (C, 256)).astype(np.int32)
            self.add("quantize_input", "q", ["px"], {}, {"lut": lut}, info)

    # -- any node --------------------------------------------------------------------------------------------
    def add(self, op: str, name: str, inputs: list[str], attrs: dict, params: dict | None = None,
            info: TensorInfo | None = None, dtype: str | None = None, zero_point: int | None = None) -> str:
        """Append a node. Its TensorInfo: `info` (its shape from the reference), else its first input's grid,
        with `dtype` (int32: a 32-bit accumulator) and `zero_point` when given."""
        node = Node(op, name, tuple(inputs), attrs, params or {})
        y = EXECUTORS[op](node, [self.sample[i] for i in inputs])
        if info is None:
            src = self.tensors[inputs[0]]
            dtype = dtype or src.dtype
            bits = 32 if dtype == "int32" else src.bits if dtype == src.dtype else 8
            zp = src.zero_point if zero_point is None else zero_point
            info = TensorInfo(tuple(y.shape[1:]), dtype, bits, dtype != "uint8", src.scale, zp)
        else:
            info = TensorInfo(tuple(y.shape[1:]), info.dtype, info.bits, info.signed, info.scale, info.zero_point)
        self.nodes.append(node)
        self.tensors[name] = info
        self.sample[name] = y.astype(info.dtype)
        return name

    def real(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        s = np.asarray(t.scale).reshape((1, -1) + (1,) * (self.sample[name].ndim - 2))
        return s * (self.sample[name].astype(np.int64) - t.zero_point)

    def graph(self, output: str | None = None) -> IntGraph:
        h, w, c = self.pixels.shape[1:]
        return IntGraph("px", (h, w, c), self.nodes, self.tensors, output or self.nodes[-1].name)

    # -- random numbers --------------------------------------------------------------------------------------
    def conv(self, name: str, x: str, out_ch: int, k: int = 3, stride=(1, 1), padding=(1, 1), dilation=(1, 1),
             groups: int = 1, bits: int = 8) -> str:
        cin = self.tensors[x].shape[0]
        q = 2 ** (bits - 1) - 1
        weight = self.rng.integers(-q, q + 1, (out_ch, cin // groups, k, k)).astype(np.int8)
        bias = self.rng.integers(-5000, 5000, out_ch).astype(np.int32)
        attrs = {"stride": list(stride), "padding": list(padding), "dilation": list(dilation), "groups": groups,
                 "input_zero_point": self.tensors[x].zero_point, "weight_bits": bits}
        return self.add("conv2d", name, [x], attrs, {"weight": weight, "bias": bias}, dtype="int32", zero_point=0)

    def dense(self, name: str, x: str, out: int, bits: int = 8) -> str:
        q = 2 ** (bits - 1) - 1
        weight = self.rng.integers(-q, q + 1, (out, self.tensors[x].shape[0])).astype(np.int8)
        attrs = {"input_zero_point": self.tensors[x].zero_point, "weight_bits": bits}
        return self.add("dense", name, [x], attrs, {"weight": weight, "bias": self.rng.integers(-9999, 9999, out)
                                                    .astype(np.int32)}, dtype="int32", zero_point=0)

    def requantize(self, name: str, terms: list[str], dtype: str = "uint8", zero_point: int = 3, relu: bool = False,
                   per_channel: bool = True, shifts=(40, 45)) -> str:
        """Realistic dyadic multipliers: M0 in [2^30, 2^31) for the first term, shifts in `shifts`."""
        ch = self.tensors[terms[0]].shape[0] if per_channel else 1
        m = self.rng.integers(2**30, 2**31, (len(terms), ch), dtype=np.int64)
        m[1:] >>= self.rng.integers(0, 12, (len(terms) - 1, ch))  # later terms: smaller scale ratios
        shift = self.rng.integers(shifts[0], shifts[1] + 1, ch).astype(np.int64)
        offset = self.rng.integers(-(2**62), 2**62, ch, dtype=np.int64) >> (56 - shift)  # a bias up to ~2^6 LSB
        lo, hi = (-128, 127) if dtype == "int8" else (0, 255)
        attrs = {"input_zero_points": [self.tensors[t].zero_point for t in terms], "output_zero_point": zero_point,
                 "qmin": zero_point if relu else lo, "qmax": hi}
        params = {"multiplier": m, "shift": shift, "offset": offset}
        return self.add("requantize", name, terms, attrs, params, dtype=dtype, zero_point=zero_point)

    # -- calibrated numbers ----------------------------------------------------------------------------------
    def normalized_input(self, name: str) -> str:
        """int8 quantize_input of (pixel / 255 - MEAN) / STD, symmetric."""
        norm = (np.arange(256)[None, :] / 255 - MEAN[:, None]) / STD[:, None]  # [C, 256]
        s = np.abs(norm).max() / 127
        lut = np.clip(round_half_up_np(norm / s), -128, 127).astype(np.int32)
        return self.add("quantize_input", name, ["px"], {}, {"lut": lut}, TensorInfo((), "int8", 8, True, (s,), 0))

    def linear(self, name: str, x: str, out: int, wbits: int, conv: bool, logits: bool = False) -> str:
        """conv2d (3x3, pad 1) or dense with He-scaled weights; its real bias goes to the next requantize, or
        into the int32 bias at the accumulator scale for the logits layer."""
        xi = self.tensors[x]
        qw = 2 ** (wbits - 1) - 1
        cin = xi.shape[0]
        wshape = (out, cin, 3, 3) if conv else (out, cin)
        w = self.rng.integers(-qw, qw + 1, wshape).astype(np.int8)
        s_w = self.rng.uniform(0.5, 1.0, out) * np.sqrt(2 / np.prod(wshape[1:])) / qw * 2
        acc_scale = xi.scale[0] * s_w
        real_bias = self.rng.normal(0, 0.1, out)
        bias = round_half_up_np(real_bias / acc_scale).astype(np.int32) if logits else np.zeros(out, np.int32)
        if not logits:
            self.biases[name] = real_bias
        attrs = {"input_zero_point": xi.zero_point, "weight_bits": wbits}
        if conv:
            attrs.update(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)
        return self.add("conv2d" if conv else "dense", name, [x], attrs, {"weight": w, "bias": bias},
                        TensorInfo((), "int32", 32, True, tuple(acc_scale), 0))

    def calibrated_requantize(self, name: str, terms: tuple[str, ...], bits: int, signed: bool, zp: int, relu: bool,
                              bias: np.ndarray | None = None) -> str:
        """Round sum(terms) + bias (+ the real biases of conv terms) once, with a scale from the sample and one
        shift per channel set by the largest term."""
        channels = max(len(self.tensors[t].scale) for t in terms)
        bias = np.zeros(channels) if bias is None else bias
        bias = bias + sum(self.biases.get(t, 0) for t in terms)
        per_channel = (1, -1) + (1,) * (self.sample[terms[0]].ndim - 2)
        total = sum(self.real(t) for t in terms) + bias.reshape(per_channel)
        if relu:
            total = np.maximum(total, 0)
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        s_y = float(np.quantile(np.abs(total), 0.999)) / (qmax - zp if relu else (qmax - qmin) / 2)
        m = np.stack([np.broadcast_to(self.tensors[t].scale, (channels,)) / s_y for t in terms])
        _, shift = dyadic_multiplier(m.max(axis=0))
        multiplier = round_half_up_np(m * 2.0 ** shift).astype(np.int64)
        offset = round_half_up_np(bias / s_y * 2.0 ** shift).astype(np.int64)
        attrs = {"input_zero_points": [self.tensors[t].zero_point for t in terms], "output_zero_point": zp,
                 "qmin": max(qmin, zp) if relu else qmin, "qmax": qmax}
        return self.add("requantize", name, list(terms), attrs,
                        {"multiplier": multiplier, "shift": shift, "offset": offset},
                        TensorInfo((), "int8" if signed else "uint8", bits, signed, (s_y,), zp))


def frac_round_half_up(x: Fraction) -> int:
    """The documented rounding, exactly: floor(x + 1/2) of a Fraction."""
    return math.floor(x + Fraction(1, 2))


def smooth_pixels(n: int, seed: int) -> np.ndarray:
    """Smooth-ish random 8x8 RGB images (a coarse random field, upsampled, plus noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, 2, 2, 3)).repeat(4, axis=1).repeat(4, axis=2)
    return np.clip(coarse + rng.normal(0, 30, coarse.shape), 0, 255).astype(np.uint8)


# -- reference graphs -------------------------------------------------------------------------------------------
def all_ops_graph(seed: int = 0) -> IntGraph:
    """Every op once, as in a small ResNet: int8 and packed int4 convs, a residual, pools, an option-A shortcut."""
    m = GraphMaker(seed)
    m.conv("c1", "q", 4)
    m.requantize("r1", ["c1"], relu=True)
    m.conv("c2", "r1", 4, groups=2, bits=4)
    m.requantize("r2", ["c2", "r1"], relu=True)
    m.add("max_pool2d", "mp", ["r2"], {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]})
    m.add("strided_slice", "sl", ["mp"], {"begin": [0, 0, 0, 0], "end": [2**31 - 1, 4, 4, 4], "step": [1, 1, 2, 2]})
    m.add("pad", "pd", ["sl"], {"pads": [[0, 0], [2, 2], [0, 0], [0, 0]], "value": m.tensors["sl"].zero_point})
    m.add("clamp", "cl", ["pd"], {"qmin": 4, "qmax": 200})
    m.add("sum_pool2d", "sp", ["cl"], {"kernel": [2, 2], "stride": [2, 2]}, dtype="int32", zero_point=4 * 3)
    m.requantize("rp", ["sp"], per_channel=False, shifts=(36, 38))
    m.add("reshape", "fl", ["rp"], {"shape": [-1]})
    m.dense("fc", "fl", 5)
    return m.graph()


def residual_net(wbits: int, abits: int, seed: int = 0) -> IntGraph:
    """quantize_input -> conv(8b) -> requantize(relu, abits) -> conv(wbits) -> requantize(acc + residual, relu,
    abits) -> global sum_pool2d -> requantize(8b signed, zp -10) -> reshape -> dense(8b): 10 int32 logits,
    with calibrated scales. Conv biases are real offsets in the requantize nodes (the ONNX export folds them
    into the conv bias); act3 has a bias of its own (an Add in ONNX)."""
    m = GraphMaker(seed, pixels=smooth_pixels(256, seed + 100), quantize_input=False)
    x = m.normalized_input("input_q")
    a1 = m.calibrated_requantize("act1", (m.linear("conv1", x, 8, 8, conv=True),), abits, False, 0, relu=True)
    a2 = m.calibrated_requantize("act2", (m.linear("conv2", a1, 8, wbits, conv=True), a1), abits, False, 0, relu=True)
    a2i = m.tensors[a2]
    pool = m.add("sum_pool2d", "pool", [a2], {"kernel": [8, 8], "stride": [8, 8]},
                 info=TensorInfo((), "int32", 32, True, (a2i.scale[0] / 64,), 64 * a2i.zero_point))
    a3 = m.calibrated_requantize("act3", (pool,), 8, True, -10, relu=False, bias=np.linspace(-0.2, 0.2, 8))
    flat = m.add("reshape", "flat", [a3], {"shape": [8]})
    m.linear("fc", flat, 10, 8, conv=False, logits=True)
    return m.graph()


def grid_ops_net(seed: int = 0) -> IntGraph:
    """Ops that are exact on the integer grid: pad (zero point), max_pool2d, strided_slice, clamp."""
    m = GraphMaker(seed, pixels=smooth_pixels(64, seed + 200), quantize_input=False)
    x = m.normalized_input("input_q")
    p = m.add("pad", "pad", [x], {"pads": [[0, 0], [0, 0], [1, 1], [1, 1]], "value": 0})
    mp = m.add("max_pool2d", "maxpool", [p], {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]})
    sl = m.add("strided_slice", "slice", [mp], {"begin": [0, 1, 0, 1], "end": [2**31 - 1, 3, 5, 5],
                                                "step": [1, 1, 2, 1]})
    c = m.add("clamp", "clamp", [sl], {"qmin": -20, "qmax": 50})
    flat = m.add("reshape", "flat", [c], {"shape": [-1]})
    m.linear("fc", flat, 10, 8, conv=False, logits=True)
    return m.graph()


# -- compiled graphs --------------------------------------------------------------------------------------------
def assert_exact(g: IntGraph, executable=None, device: str = "cpu", **compile_opts) -> None:
    """The compiled graph equals the reference bit for bit, at batch 1 and 3 through one compiled module."""
    from lower.tvm_build import compile_graph
    from runtime.executable import run_executable

    executable = executable or compile_graph(g, **compile_opts)
    params = pack_params(g)
    rng = np.random.default_rng(123)
    h, w, c = g.input_shape
    for batch in BATCHES:
        x = rng.integers(0, 256, (batch, h, w, c), dtype=np.uint8)
        x[0, :2] = 0  # extremes of the lookup table
        x[-1, -2:] = 255
        expected = run_graph(g, x)
        got = run_executable(executable, x, params, device)
        assert got.dtype == np.int32 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


# -- a tiny trained-looking student -----------------------------------------------------------------------------
def make_tiny_student(wbits: int = 8, abits: int = 8, seed: int = 0, residual_bits: int | None = None):
    """A calibrated fake-quant TinyNet student (16x16 input, 10 classes) and its ArchInfo: the standard
    fixture for lowering tests. Calibrated with MSE ranges on seeded random pixels."""
    import torch

    from core.pixels import normalize
    from train.models import get_arch
    from train.quant.calibrate import calibrate
    from train.quant.convert import QuantConfig, quantize_model

    info = get_arch("tinynet")
    torch.manual_seed(seed)
    student = quantize_model(build_model("tinynet").eval(), QuantConfig(wbits=wbits, abits=abits,
                                                                          residual_bits=residual_bits))
    c, h, w = info.input_size
    pixels = np.random.default_rng(seed).integers(0, 256, (64, h, w, c), dtype=np.uint8)
    calibrate(student, [normalize(pixels, info.mean, info.std).contiguous()], "mse")
    return student, info


# -- float teachers for conversion and calibration tests ----------------------------------------------------
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics/affine parameters, so that folding is actually exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model


def teacher(arch: str) -> nn.Module:
    """A seeded teacher with non-trivial BN (tinynet: its own seeded weights)."""
    torch.manual_seed(0)
    if arch == "tinynet":
        return TinyNet(10).eval()
    return randomize_bn(build_model(arch)).eval()


INPUT = {"tinynet": (3, 16, 16), "resnet20": (3, 32, 32), "resnet18": (3, 224, 224), "mobilenet_v2": (3, 224, 224)}


def batch(arch: str, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *INPUT[arch], generator=torch.Generator().manual_seed(seed))


def main_in_process(module: str, args: list[str], capsys) -> tuple[int, str, str]:
    """`python -m module args` in this process (no interpreter start-up): exit code, stdout, stderr. Every
    CLI keeps one subprocess test; argument-error lists run here."""
    try:
        code = importlib.import_module(module).main([str(a) for a in args])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(code: int, out: str, err: str) -> str:
    """The single `error: ...` line of a failed CLI run (exit 2, nothing on stdout, no traceback)."""
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error:"), err[-3000:]
    return lines[0]
