"""Fake-quant student (fx.GraphModule from `train.quant.convert`) -> integer graph (`lower.graph`).

A pure function of the student, driven by a converter table over the student's fx nodes. Values flow as:
- a quantized tensor (an integer tensor whose TensorInfo says how it maps to reals);
- a *pending sum*: a linear combination of integer tensors (conv accumulators, quantized residual
  inputs, pooled sums) with an optional ReLU/ReLU6, not yet rounded. The next activation quantizer turns it
  into one `requantize` node, so a conv output, its residual add and its ReLU are rounded once — as the
  fake-quant student does (it computes the sum in float and rounds once, half up).
Real values are kept exactly: every tensor has real = scale * (q - zero_point) (TensorInfo). Multipliers are
dyadic (M0 * 2^-n, M0 < 2^31) with one shift per output channel shared by all terms of a sum, chosen so the
int64 sum provably cannot overflow.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from core.errors import DFQFError
from core.pixels import normalize
from train.quant import primitives as P
from train.quant.convert import kind_names
from train.quant.modules import ActQuantizer, QuantConv2d, QuantLinear

from .graph import IntGraph, Node, TensorInfo

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Pending:
    """sum of the real values of `terms` (graph tensor names) plus a real per-channel `bias`, then ReLU
    clipped to [0, relu_max] if relu. Biases stay real until the sum is rounded: the requantizer adds them
    with its own 2^-shift precision, where an int32 bias at the accumulator scale s_x*s_w would be off by
    up to half an accumulator step (at 4 bits, a visible fraction of an output step)."""

    terms: tuple[str, ...]
    bias: np.ndarray | None = None
    relu: bool = False
    relu_max: float | None = None


@dataclass(frozen=True)
class Quantized:
    name: str


@dataclass(frozen=True)
class RawInput:
    pass


Value = Pending | Quantized | RawInput


class _Integerizer:
    def __init__(self, student: fx.GraphModule, mean: Sequence[float], std: Sequence[float],
                 input_size: Sequence[int]) -> None:
        self.student, self.mean, self.std = student, tuple(mean), tuple(std)
        self.input_size = tuple(input_size)  # C, H, W
        self.nodes: list[Node] = []
        self.tensors: dict[str, TensorInfo] = {}
        self.bound: dict[str, int] = {}  # max |q - zero_point| of every tensor: proves int32/int64 ranges
        self.values: dict[fx.Node, Value] = {}
        ShapeProp(student).propagate(torch.zeros(1, *self.input_size))

    # -- helpers -----------------------------------------------------------------------------------
    def shape(self, n: fx.Node) -> tuple[int, ...]:
        return tuple(n.meta["tensor_meta"].shape[1:])

    def emit(self, node: Node, info: TensorInfo, bound: int) -> Quantized:
        self.nodes.append(node)
        self.tensors[node.name] = info
        self.bound[node.name] = int(bound)
        return Quantized(node.name)

    def quantized(self, n: fx.Node, what: str) -> str:
        v = self.values[n]
        if not isinstance(v, Quantized):
            raise DFQFError(f"{what} needs a quantized input, but {n.name} is not quantized "
                            f"(the student was not built by train.quant.convert?)")
        return v.name

    def module(self, n: fx.Node) -> nn.Module:
        return self.student.get_submodule(n.target)

    # -- run ---------------------------------------------------------------------------------------
    def run(self) -> IntGraph:
        output = None
        for n in self.student.graph.nodes:
            if n.op == "placeholder":
                self.values[n] = RawInput()
            elif n.op == "output":
                output = self.output(n.args[0])
            else:
                kind = type(self.module(n)) if n.op == "call_module" else n.target
                handler = LOWERINGS.get(kind)
                if handler is None:
                    name = getattr(kind, "__name__", str(kind))
                    raise DFQFError(f"cannot lower {n.name} ({name}); supported: {supported_ops()}")
                self.values[n] = handler(self, n)
        c, h, w = self.input_size
        return IntGraph("pixels", (h, w, c), self.nodes, self.tensors, output)

    def output(self, arg: Any) -> str:
        if not isinstance(arg, fx.Node):
            raise DFQFError("only models with a single tensor output can be lowered")
        v = self.values[arg]
        if isinstance(v, Quantized):
            return v.name
        if isinstance(v, Pending) and len(v.terms) == 1 and not v.relu:
            if v.bias is not None:  # logits: the bias goes into the int32 accumulator
                self.add_int32_bias(v.terms[0], v.bias)
            return v.terms[0]
        raise DFQFError(f"the model output {arg.name} is a sum or ReLU that no quantizer rounds; "
                        "end the model with a conv/linear layer")

    def add_int32_bias(self, name: str, bias: np.ndarray) -> None:
        node, info = self.node_named(name), self.tensors[name]
        b = P.round_half_up_np(bias / np.asarray(info.scale, np.float64))
        if self.bound[name] + np.abs(b).max() > INT32_MAX:
            raise DFQFError(f"{name}: the int32 accumulator could overflow with its bias")
        node.params["bias"] = (node.params["bias"].astype(np.int64) + b.astype(np.int64)).astype(np.int32)
        self.bound[name] += int(np.abs(b).max())

    def node_named(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    # -- requantization: one rounding for a whole pending sum --------------------------------------
    def requantize(self, name: str, v: Pending, q: ActQuantizer, shape: tuple[int, ...]) -> Quantized:
        spec = q.spec
        s_y = float(q.scale.detach().double())
        if not s_y > 0:
            raise DFQFError(f"quantizer {name} has a non-positive scale {s_y} (not calibrated?)")
        zp = int(q.zero_point)
        qmin, qmax = spec.qmin, spec.qmax
        if v.relu:
            qmin = max(qmin, zp)  # relu(r) rounds to max(zp, round(r/s) + zp)
            if v.relu_max is not None:
                qmax = min(qmax, int(P.round_half_up_np(v.relu_max / s_y)) + zp)
        channels = max(len(self.tensors[t].scale) for t in v.terms)
        m = np.stack([np.broadcast_to(np.asarray(self.tensors[t].scale, np.float64), (channels,)) / s_y
                      for t in v.terms])  # [k, C]
        bounds = np.array([self.bound[t] for t in v.terms], dtype=object)
        bias = np.zeros(channels) if v.bias is None else np.broadcast_to(v.bias / s_y, (channels,))
        try:
            multiplier, shift, offset = P.joint_dyadic(m, bounds, bias)
        except ValueError as e:
            raise DFQFError(f"{name}: {e}") from None
        info = TensorInfo(shape, "int8" if spec.signed else "uint8", spec.bits, spec.signed, (s_y,), zp)
        node = Node("requantize", name, v.terms,
                    {"input_zero_points": [self.tensors[t].zero_point for t in v.terms],
                     "output_zero_point": zp, "qmin": qmin, "qmax": qmax},
                    {"multiplier": multiplier, "shift": shift, "offset": offset})
        return self.emit(node, info, max(abs(qmin - zp), abs(qmax - zp)))


# -- lowering functions: one per student node kind ------------------------------------------------------
def _act_quantizer(z: _Integerizer, n: fx.Node) -> Value:
    q: ActQuantizer = z.module(n)
    v = z.values[n.args[0]]
    if isinstance(v, RawInput):
        return _quantize_input(z, n, q)
    if isinstance(v, Quantized):
        v = Pending((v.name,))
    return z.requantize(n.name, v, q, z.shape(n))


def _quantize_input(z: _Integerizer, n: fx.Node, q: ActQuantizer) -> Quantized:
    """A [C, 256] table: pixel value -> quantize(normalize(pixel)), computed with the student's own float ops."""
    c = z.input_size[0]
    pixels = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 256, 1, 1), (1, 256, 1, c))
    x = normalize(np.ascontiguousarray(pixels), z.mean, z.std)  # [1, C, 256, 1]
    with torch.no_grad():
        lut = P.quantize(x, q.scale.detach(), q.zero_point, q.spec)[0, :, :, 0]
    spec, zp = q.spec, int(q.zero_point)
    info = TensorInfo(z.shape(n), "int8" if spec.signed else "uint8", spec.bits, spec.signed,
                      (float(q.scale.detach().double()),), zp)
    node = Node("quantize_input", n.name, ("pixels",), {}, {"lut": lut.numpy().astype(np.int32)})
    return z.emit(node, info, max(abs(spec.qmin - zp), abs(spec.qmax - zp)))


def _conv_or_dense(z: _Integerizer, n: fx.Node) -> Pending:
    mod = z.module(n)
    x = z.quantized(n.args[0], n.name)
    xi = z.tensors[x]
    wq = mod.weight_quantizer
    with torch.no_grad():
        s_w = wq.scale.detach().double()
        bad = torch.nonzero(~(s_w > 0)).flatten().tolist()  # not positive, or NaN
        if bad:
            raise DFQFError(f"{n.name}: the learned weight step of output channel {bad[0]} is {float(s_w[bad[0]]):.3g} "
                            f"({len(bad)} channel(s) not positive); a student trained before steps were kept "
                            "positive (train.quant.modules.keep_steps_positive) cannot be lowered: retrain it")
        w = P.quantize(mod.weight.detach(), wq.scale.detach(), wq.zero_point, wq.spec, axis=0).numpy()
        acc_scale = xi.scale[0] * s_w.numpy()
        bias = mod.bias.detach().double().numpy()  # real: added when the sum is rounded (see Pending)
    per_out = np.abs(w.reshape(w.shape[0], -1)).astype(np.int64).sum(axis=1)
    acc_bound = z.bound[x] * per_out
    if acc_bound.max() > INT32_MAX:
        raise DFQFError(f"{n.name}: the int32 accumulator could overflow (bound {int(acc_bound.max())})")
    attrs: dict[str, Any] = {"input_zero_point": xi.zero_point, "weight_bits": wq.spec.bits}
    if isinstance(mod, QuantConv2d):
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            raise DFQFError(f"{n.name}: only explicit zero padding is supported")
        attrs.update(stride=list(mod.stride), padding=list(mod.padding), dilation=list(mod.dilation),
                     groups=mod.groups)
    node = Node("conv2d" if isinstance(mod, QuantConv2d) else "dense", n.name, (x,), attrs,
                {"weight": w.astype(np.int8), "bias": np.zeros(w.shape[0], np.int32)})
    info = TensorInfo(z.shape(n), "int32", 32, True, tuple(float(s) for s in acc_scale), 0)
    z.emit(node, info, int(acc_bound.max()))
    return Pending((n.name,), bias)


def _relu(z: _Integerizer, n: fx.Node) -> Value:
    relu_max = 6.0 if n.op == "call_module" and isinstance(z.module(n), nn.ReLU6) else None
    v = z.values[n.args[0]]
    if isinstance(v, Pending):
        return Pending(v.terms, v.bias, True, relu_max)
    x = z.quantized(n.args[0], n.name)
    xi = z.tensors[x]
    lo, hi = xi.qrange
    qmax = hi if relu_max is None else min(hi, int(P.round_half_up_np(relu_max / xi.scale[0])) + xi.zero_point)
    if lo >= xi.zero_point and qmax == hi:
        return v  # already non-negative: ReLU is the identity on this grid
    node = Node("clamp", n.name, (x,), {"qmin": max(lo, xi.zero_point), "qmax": qmax})
    return z.emit(node, xi, z.bound[x])


def _add(z: _Integerizer, n: fx.Node) -> Pending:
    terms: list[str] = []
    bias = None
    for a in n.args:
        v = z.values[a] if isinstance(a, fx.Node) else None
        if isinstance(v, Quantized):
            terms.append(v.name)
        elif isinstance(v, Pending) and not v.relu:
            terms.extend(v.terms)
            if v.bias is not None:
                bias = v.bias if bias is None else bias + v.bias
        else:
            raise DFQFError(f"cannot lower {n.name}: add of a non-tensor or of an unrounded ReLU")
    return Pending(tuple(terms), bias)


def _same_grid(z: _Integerizer, n: fx.Node, op: str, attrs: dict[str, Any]) -> Quantized:
    """Ops exact on the integer grid: the output keeps the input's scale and zero point."""
    x = z.quantized(n.args[0], n.name)
    xi = z.tensors[x]
    info = TensorInfo(z.shape(n), xi.dtype, xi.bits, xi.signed, xi.scale, xi.zero_point)
    return z.emit(Node(op, n.name, (x,), attrs), info, z.bound[x])


def _max_pool(z: _Integerizer, n: fx.Node) -> Quantized:
    m: nn.MaxPool2d = z.module(n)
    pair = nn.modules.utils._pair
    if m.ceil_mode or pair(m.dilation) != (1, 1):
        raise DFQFError(f"{n.name}: max pooling with ceil_mode or dilation is not supported")
    stride = m.stride if m.stride is not None else m.kernel_size
    return _same_grid(z, n, "max_pool2d", {"kernel": list(pair(m.kernel_size)), "stride": list(pair(stride)),
                                           "padding": list(pair(m.padding))})


def _reshape(z: _Integerizer, n: fx.Node) -> Quantized:
    return _same_grid(z, n, "reshape", {"shape": list(z.shape(n))})


def _getitem(z: _Integerizer, n: fx.Node) -> Quantized:
    index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    in_shape = (1,) + z.shape(n.args[0])
    if len(index) > len(in_shape) or not all(isinstance(s, slice) for s in index):
        raise DFQFError(f"{n.name}: only slicing with start:stop:step is supported")
    index = index + (slice(None),) * (len(in_shape) - len(index))
    if index[0] != slice(None):
        raise DFQFError(f"{n.name}: slicing the batch axis is not supported")
    begin, end, step = zip(*(s.indices(d) for s, d in zip(index, in_shape)))
    return _same_grid(z, n, "strided_slice", {"begin": [0, *begin[1:]], "end": [2**31 - 1, *end[1:]],
                                              "step": list(step)})


def _pad(z: _Integerizer, n: fx.Node) -> Quantized:
    pad = list(n.args[1] if len(n.args) > 1 else n.kwargs["pad"])
    mode = n.args[2] if len(n.args) > 2 else n.kwargs.get("mode", "constant")
    value = n.args[3] if len(n.args) > 3 else n.kwargs.get("value", None)
    if mode != "constant" or value not in (None, 0, 0.0):
        raise DFQFError(f"{n.name}: only zero padding is supported")
    rank = len(z.shape(n.args[0])) + 1
    pads = [[0, 0] for _ in range(rank)]
    for i in range(len(pad) // 2):  # F.pad lists (before, after) from the last axis backwards
        pads[rank - 1 - i] = [pad[2 * i], pad[2 * i + 1]]
    x = z.quantized(n.args[0], n.name)
    return _same_grid(z, n, "pad", {"pads": pads, "value": z.tensors[x].zero_point})


def _avg_pool(z: _Integerizer, n: fx.Node) -> Pending:
    """Integer window sum; the division by the window size is folded into the next requantization."""
    x = z.quantized(n.args[0], n.name)
    xi = z.tensors[x]
    _, h, w = xi.shape
    oh, ow = z.shape(n)[1:]
    m = z.module(n) if n.op == "call_module" else None
    if isinstance(m, nn.AvgPool2d):
        pair = nn.modules.utils._pair
        if pair(m.padding) != (0, 0) or m.ceil_mode or m.divisor_override:
            raise DFQFError(f"{n.name}: average pooling with padding, ceil_mode or divisor_override is not supported")
        kernel = pair(m.kernel_size)
        stride = pair(m.stride if m.stride is not None else m.kernel_size)
    elif (oh, ow) == (1, 1):
        kernel, stride = (h, w), (h, w)
    elif h % oh == 0 and w % ow == 0:
        kernel = stride = (h // oh, w // ow)
    else:
        raise DFQFError(f"{n.name}: adaptive average pooling to {oh}x{ow} from {h}x{w} is not a fixed window")
    k = kernel[0] * kernel[1]
    info = TensorInfo(z.shape(n), "int32", 32, True, tuple(s / k for s in xi.scale), k * xi.zero_point)
    z.emit(Node("sum_pool2d", n.name, (x,), {"kernel": list(kernel), "stride": list(stride)}), info,
           k * z.bound[x])
    return Pending((n.name,))


LOWERINGS: dict[Any, Callable[[_Integerizer, fx.Node], Value]] = {
    ActQuantizer: _act_quantizer,
    QuantConv2d: _conv_or_dense,
    QuantLinear: _conv_or_dense,
    nn.ReLU: _relu,
    nn.ReLU6: _relu,
    F.relu: _relu,
    torch.relu: _relu,
    "relu": _relu,
    operator.add: _add,
    operator.iadd: _add,
    torch.add: _add,
    nn.MaxPool2d: _max_pool,
    nn.Flatten: _reshape,
    torch.flatten: _reshape,
    "flatten": _reshape,
    "view": _reshape,
    "reshape": _reshape,
    operator.getitem: _getitem,
    F.pad: _pad,
    nn.AdaptiveAvgPool2d: _avg_pool,
    nn.AvgPool2d: _avg_pool,
    F.adaptive_avg_pool2d: _avg_pool,
}


def supported_ops() -> str:
    return kind_names(LOWERINGS)


def integerize(student: fx.GraphModule, mean: Sequence[float], std: Sequence[float],
               input_size: Sequence[int], meta: dict[str, Any] | None = None) -> IntGraph:
    """The integer graph of a calibrated/fine-tuned fake-quant student that takes uint8 pixels."""
    student = student.eval()
    with torch.no_grad():
        g = _Integerizer(student, mean, std, input_size).run()
    g.meta = dict(meta or {})
    return g
