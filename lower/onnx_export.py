"""Integer graph (`lower.graph`) -> standard ONNX QDQ model that ONNX Runtime runs (opset 21).

Every integer tensor t is represented by its real value scale * (t - zero_point) (its TensorInfo):
- 8-bit-storage tensors (uint8/int8) as QuantizeLinear -> DequantizeLinear pairs, so ORT sees the usual
  QDQ pattern and can fuse it (DQ -> Conv -> Q into QLinearConv, DQ -> Add -> Q into QLinearAdd, ...);
- int32 tensors (conv/dense accumulators, window sums) as plain float tensors: a conv accumulator with
  scale s_x * s_w is the float Conv of the real input with the real weight DequantizeLinear(w, s_w, axis 0)
  and real bias DequantizeLinear(b, s_x * s_w, axis 0); a window sum with scale s_x / k and zero point
  k * z_x is the AveragePool of the real input.
A requantize node is the Add of its terms' real values (and its bias), then the QDQ pair, clamped to
[qmin, qmax] where that is narrower than the storage range (ReLU, 4-bit values stored in 8 bits). The
input LUT is exact: a Gather of the flattened table at c * 256 + pixel, then DequantizeLinear. Output:
float logits (the real value of the graph's int32 output).

Requantize biases (the `offset` param, real bias = s_y * offset / 2^shift) are by default folded into the
int32 bias of the conv/dense they follow (`fold_bias`), rounded to the accumulator scale s_x * s_w, so
DQ -> Conv -> Q stays ORT's QLinearConv pattern; `fold_bias=False` adds them in float instead.
int8 activations are exported as uint8 with zero point + 128 (the same reals, exactly): ORT's fast path
takes u8 activations and s8 per-channel weights. A clamp narrower than the storage range is a uint8 Clip
after QuantizeLinear (exactly the integer graph's clamp, and it keeps the conv fusable).

Not bit-exact with `lower.reference`: ONNX computes in float32 and QuantizeLinear rounds half to even, the
integer graph rounds the dyadic product half up; folded biases lose up to half an accumulator step. Tests
state the agreement in output LSBs.

int4 (`int4=True`, the default): weights of <= 4 bits are INT4 initializers (DequantizeLinear per axis) and
activations of <= 4 bits are UINT4/INT4 QuantizeLinear/DequantizeLinear pairs; ONNX Runtime 1.32 CPU runs
both (measured). Its fused integer kernels (QLinearConv, ...) are 8-bit only, so int4 layers run as float
ops between Q/DQ. `int4=False` stores 4-bit values in int8/uint8 (with a uint8 Clip to the 4-bit range),
which ORT fuses into its u8 x s8 kernels.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from core.errors import DFQFError
from train.quant.primitives import round_half_up_np

from .graph import IntGraph, Node, TensorInfo
from .ort_graph import term_scale

OPSET, IR_VERSION = 21, 10
INPUT, OUTPUT = "pixels", "logits"
_STORAGE_RANGE = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127),
                  TensorProto.UINT4: (0, 15), TensorProto.INT4: (-8, 7)}


def _u8_offset(info: TensorInfo) -> int:
    return 128 if info.dtype == "int8" else 0


class _Builder:
    """Accumulates ONNX nodes and initializers; `real[t]` is the ONNX name of integer tensor t's real value."""

    def __init__(self, graph: IntGraph, int4: bool, fold_bias: bool, split_sums: bool = False) -> None:
        self.graph, self.int4, self.split_sums = graph, int4, split_sums
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.real: dict[str, str] = {}
        # conv/dense name -> its int32 bias with the reading requantize's bias folded in
        self.folded_bias = _fold_requantize_biases(graph) if fold_bias else {}

    def const(self, name: str, values, dtype: int, dims=None) -> str:
        values = np.asarray(values)
        dims = list(values.shape) if dims is None else dims
        if dtype in (TensorProto.INT4, TensorProto.UINT4):  # make_tensor packs two per byte
            self.inits.append(helper.make_tensor(name, dtype, dims, values.ravel().tolist()))
        else:  # raw little-endian bytes: int8 stored as int32 varints would be 5x larger
            array = values.astype(helper.tensor_dtype_to_np_dtype(dtype)).reshape(dims)
            self.inits.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def storage(self, info: TensorInfo) -> tuple[int, int]:
        """(ONNX element type, zero-point offset) of a quantized activation: 4-bit types for <= 4-bit values
        when int4 is on; otherwise uint8, int8 values moved up by 128 (q + 128 with zero point z + 128 stands
        for the same reals and QuantizeLinear gives exactly q + 128), as ORT's fast path wants u8 activations."""
        if info.dtype == "int32":
            raise DFQFError("int32 tensors are exported as float, not quantized")
        if self.int4 and info.bits <= 4:
            return (TensorProto.INT4, 0) if info.signed else (TensorProto.UINT4, 0)
        return TensorProto.UINT8, _u8_offset(info)

    def qparams(self, name: str, info: TensorInfo) -> tuple[str, str, dict]:
        """(scale, zero point, attrs) initializers for Q/DQ of a per-tensor or per-channel (axis 1) tensor."""
        scale = np.asarray(info.scale, np.float32)
        per_channel = scale.size > 1
        s = self.const(f"{name}/scale", scale, TensorProto.FLOAT, [scale.size] if per_channel else [])
        dtype, offset = self.storage(info)
        zp = np.full(scale.size, info.zero_point + offset)
        z = self.const(f"{name}/zero_point", zp, dtype, [scale.size] if per_channel else [])
        return s, z, ({"axis": 1} if per_channel else {})

    def quantize(self, name: str, real: str, qrange: tuple[int, int] | None = None) -> str:
        """QuantizeLinear -> DequantizeLinear of float `real` with node `name`'s TensorInfo; returns the DQ
        output. int32 tensors (accumulators, sums) stay float: no 32-bit QDQ.

        A `qrange` (qmin, qmax) narrower than the storage range (ReLU with a zero point inside it, 4-bit
        values stored in uint8) is a Clip on the quantized uint8 values, exactly as the integer graph clamps
        (and DQ -> Conv -> Q stays ORT's QLinearConv pattern); 4-bit ONNX types, which ORT's Clip does not
        take, are clipped on the reals before QuantizeLinear instead.
        """
        info = self.graph.tensors[name]
        if info.dtype == "int32":
            return real
        s, z, axis = self.qparams(name, info)
        dtype, offset = self.storage(info)
        lo, hi = (v - offset for v in _STORAGE_RANGE[dtype])
        qmin, qmax = (lo, hi) if qrange is None else (max(qrange[0], lo), min(qrange[1], hi))
        clip = (qmin, qmax) != (lo, hi)
        if clip and dtype != TensorProto.UINT8:
            if len(info.scale) > 1:
                raise DFQFError(f"{name}: clipping a per-channel 4-bit tensor is not supported in the ONNX export")
            bounds = [self.const(f"{name}/clip_{k}", np.float32(info.scale[0] * (v - info.zero_point)),
                                 TensorProto.FLOAT) for k, v in (("min", qmin), ("max", qmax))]
            real = self.op("Clip", [real, *bounds], f"{name}/clip_real")
        q = self.op("QuantizeLinear", [real, s, z], f"{name}/q", **axis)
        if clip and dtype == TensorProto.UINT8:
            bounds = [self.const(f"{name}/clip_{k}", np.uint8(v + offset), TensorProto.UINT8)
                      for k, v in (("min", qmin), ("max", qmax))]
            q = self.op("Clip", [q, *bounds], f"{name}/clip")
        return self.op("DequantizeLinear", [q, s, z], f"{name}/real", **axis)

    def weight(self, n: Node, out_scale: np.ndarray) -> str:
        """DequantizeLinear(int weight, per-output-channel scale, axis 0): the real weight."""
        w = np.asarray(n.params["weight"])
        dtype = TensorProto.INT4 if self.int4 and n.attrs["weight_bits"] <= 4 else TensorProto.INT8
        q = self.const(f"{n.name}/weight", w, dtype)
        s = self.const(f"{n.name}/weight_scale", out_scale.astype(np.float32), TensorProto.FLOAT)
        z = self.const(f"{n.name}/weight_zero_point", np.zeros(w.shape[0], np.int64), dtype)
        return self.op("DequantizeLinear", [q, s, z], f"{n.name}/weight_real", axis=0)

    def bias(self, n: Node, acc_scale: np.ndarray) -> str:
        b = self.folded_bias.get(n.name, np.asarray(n.params["bias"]))
        q = self.const(f"{n.name}/bias", b, TensorProto.INT32)
        s = self.const(f"{n.name}/bias_scale", acc_scale.astype(np.float32), TensorProto.FLOAT)
        z = self.const(f"{n.name}/bias_zero_point", np.zeros(b.size, np.int64), TensorProto.INT32)
        return self.op("DequantizeLinear", [q, s, z], f"{n.name}/bias_real", axis=0)


# -- converters: one per integer op; each returns the ONNX name of the node's real value ---------------
def _quantize_input(b: _Builder, n: Node) -> str:
    """real = DQ(lut[c, pixel]): Gather on the flattened table at c * 256 + pixel, exact."""
    info = b.graph.tensors[n.name]
    lut = np.asarray(n.params["lut"])
    channels = lut.shape[0]
    offset = _u8_offset(info)
    table = b.const(f"{n.name}/lut", lut.ravel() + offset, TensorProto.UINT8)
    offsets = b.const(f"{n.name}/channel_offset", np.arange(channels) * 256, TensorProto.INT64)
    index = b.op("Cast", [b.real[n.inputs[0]]], f"{n.name}/pixel_i64", to=TensorProto.INT64)
    index = b.op("Add", [index, offsets], f"{n.name}/index")
    q_nhwc = b.op("Gather", [table, index], f"{n.name}/q_nhwc", axis=0)
    q = b.op("Transpose", [q_nhwc], f"{n.name}/q", perm=[0, 3, 1, 2])
    s = b.const(f"{n.name}/scale", np.float32(info.scale[0]), TensorProto.FLOAT)
    z = b.const(f"{n.name}/zero_point", np.int64(info.zero_point + offset), TensorProto.UINT8)
    return b.op("DequantizeLinear", [q, s, z], f"{n.name}/real")


def _weight_scales(b: _Builder, n: Node) -> tuple[np.ndarray, np.ndarray]:
    """(weight scale, accumulator scale) per output channel: s_w = (s_x * s_w) / s_x."""
    x = b.graph.tensors[n.inputs[0]]
    if len(x.scale) != 1:
        raise DFQFError(f"{n.name}: conv/dense inputs must be quantized per tensor")
    o = np.asarray(n.params["weight"]).shape[0]
    acc = np.broadcast_to(np.asarray(b.graph.tensors[n.name].scale, np.float64), (o,))
    return acc / x.scale[0], acc


def _conv2d(b: _Builder, n: Node) -> str:
    a = n.attrs
    w_scale, acc_scale = _weight_scales(b, n)
    ph, pw = a["padding"]
    return b.op("Conv", [b.real[n.inputs[0]], b.weight(n, w_scale), b.bias(n, acc_scale)], n.name,
                strides=list(a["stride"]), pads=[ph, pw, ph, pw], dilations=list(a["dilation"]), group=a["groups"])


def _dense(b: _Builder, n: Node) -> str:
    w_scale, acc_scale = _weight_scales(b, n)
    return b.op("Gemm", [b.real[n.inputs[0]], b.weight(n, w_scale), b.bias(n, acc_scale)], n.name, transB=1)


def _requantize(b: _Builder, n: Node) -> str:
    terms = [b.real[t] for t in n.inputs]
    if b.split_sums and len(n.inputs) > 1:
        terms = [_term_codes(b, n, t) if b.graph.tensors[t].dtype == "int32" else real
                 for t, real in zip(n.inputs, terms)]
    total = terms[0]
    for i, term in enumerate(terms[1:], 1):
        total = b.op("Add", [total, term], f"{n.name}/sum{i}")
    if np.any(n.params["offset"]) and not any(t in b.folded_bias for t in n.inputs):
        info = b.graph.tensors[n.name]
        bias = _requantize_bias(b.graph, n).reshape((-1,) + (1,) * (len(info.shape) - 1))
        total = b.op("Add", [total, b.const(f"{n.name}/bias", bias.astype(np.float32), TensorProto.FLOAT)],
                     f"{n.name}/biased")
    return b.quantize(n.name, total, (n.attrs["qmin"], n.attrs["qmax"]))


def _term_codes(b: _Builder, n: Node, t: str) -> str:
    """The `fast` variant: an int32 term of a sum (a residual block's conv) quantized on its own to int8 codes
    (stored u8 + 128) at `lower.ort_graph.term_scale`, as the --for-ort graph does, then DequantizeLinear:
    DQ -> Conv -> Q and DQ -> Add -> Q are ORT's QLinearConv and QLinearAdd. A second rounding: up to half
    a term step."""
    scale = b.const(f"{t}/term_scale", np.float32(term_scale(n, b.graph)), TensorProto.FLOAT)
    zero = b.const(f"{t}/term_zero_point", np.uint8(128), TensorProto.UINT8)
    q = b.op("QuantizeLinear", [b.real[t], scale, zero], f"{t}/term_q")
    return b.op("DequantizeLinear", [q, scale, zero], f"{t}/term_real")


def _requantize_bias(graph: IntGraph, n: Node) -> np.ndarray:
    """The real per-channel bias a requantize node adds: s_y * offset / 2^shift."""
    scale = np.asarray(graph.tensors[n.name].scale, np.float64)
    return scale * np.asarray(n.params["offset"], np.float64) / 2.0 ** np.asarray(n.params["shift"], np.float64)


def _fold_requantize_biases(graph: IntGraph) -> dict[str, np.ndarray]:
    """Move each requantize bias into the int32 bias of a conv/dense term that only it reads, rounded to the
    accumulator scale (off by <= half an accumulator step): DQ -> Conv -> Q is then ORT's QLinearConv
    pattern. Returns {conv/dense name: new int32 bias}; biases that do not fit stay an Add in the requantize."""
    readers = Counter(i for n in graph.nodes for i in n.inputs)
    by_name = {n.name: n for n in graph.nodes}
    folded: dict[str, np.ndarray] = {}
    for n in graph.nodes:
        if n.op != "requantize" or not np.any(n.params["offset"]):
            continue
        for t in n.inputs:
            if by_name[t].op not in ("conv2d", "dense") or readers[t] != 1:
                continue
            acc_scale = np.asarray(graph.tensors[t].scale, np.float64)
            bias = np.asarray(by_name[t].params["bias"], np.int64) + round_half_up_np(
                _requantize_bias(graph, n) / acc_scale).astype(np.int64)
            if np.abs(bias).max() < 2**31:
                folded[t] = bias.astype(np.int32)
                break
    return folded


def _sum_pool2d(b: _Builder, n: Node) -> str:
    """Window sum with scale s_x / k and zero point k * z_x: its real value is the window mean."""
    x = b.graph.tensors[n.inputs[0]]
    kernel, stride = list(n.attrs["kernel"]), list(n.attrs["stride"])
    if kernel == list(x.shape[1:]):
        return b.op("GlobalAveragePool", [b.real[n.inputs[0]]], n.name)
    return b.op("AveragePool", [b.real[n.inputs[0]]], n.name, kernel_shape=kernel, strides=stride)


def _max_pool2d(b: _Builder, n: Node) -> str:
    ph, pw = n.attrs["padding"]
    y = b.op("MaxPool", [b.real[n.inputs[0]]], f"{n.name}/max", kernel_shape=list(n.attrs["kernel"]),
             strides=list(n.attrs["stride"]), pads=[ph, pw, ph, pw])
    return b.quantize(n.name, y)


def _clamp(b: _Builder, n: Node) -> str:
    return b.quantize(n.name, b.real[n.inputs[0]], (n.attrs["qmin"], n.attrs["qmax"]))


def _strided_slice(b: _Builder, n: Node) -> str:
    a = n.attrs
    rank = len(a["begin"])
    args = [b.const(f"{n.name}/{k}", np.asarray(v, np.int64), TensorProto.INT64)
            for k, v in (("starts", a["begin"]), ("ends", a["end"]), ("axes", range(rank)), ("steps", a["step"]))]
    return b.quantize(n.name, b.op("Slice", [b.real[n.inputs[0]], *args], f"{n.name}/slice"))


def _pad(b: _Builder, n: Node) -> str:
    x = b.graph.tensors[n.inputs[0]]
    if len(x.scale) != 1:
        raise DFQFError(f"{n.name}: padding a per-channel quantized tensor is not supported in the ONNX export")
    pads = np.asarray(n.attrs["pads"], np.int64)
    p = b.const(f"{n.name}/pads", np.concatenate([pads[:, 0], pads[:, 1]]), TensorProto.INT64)
    v = b.const(f"{n.name}/value", np.float32(x.scale[0] * (n.attrs["value"] - x.zero_point)), TensorProto.FLOAT)
    return b.quantize(n.name, b.op("Pad", [b.real[n.inputs[0]], p, v], f"{n.name}/pad", mode="constant"))


def _reshape(b: _Builder, n: Node) -> str:
    shape = b.const(f"{n.name}/shape", np.asarray([0, *n.attrs["shape"]], np.int64), TensorProto.INT64)
    return b.quantize(n.name, b.op("Reshape", [b.real[n.inputs[0]], shape], f"{n.name}/reshape"))


CONVERTERS: dict[str, Callable[[_Builder, Node], str]] = {
    "quantize_input": _quantize_input,
    "conv2d": _conv2d,
    "dense": _dense,
    "requantize": _requantize,
    "sum_pool2d": _sum_pool2d,
    "max_pool2d": _max_pool2d,
    "clamp": _clamp,
    "strided_slice": _strided_slice,
    "pad": _pad,
    "reshape": _reshape,
}


VARIANTS = {  # name -> to_onnx_qdq options
    "exact": {"int4": True, "fold_bias": False, "split_sums": False},  # closest to the integer graph
    "fast": {"int4": False, "fold_bias": True, "split_sums": True},  # every conv and add on ORT's int8 kernels
}


def to_onnx_qdq(graph: IntGraph, int4: bool = True, fold_bias: bool = True, split_sums: bool = False
                ) -> onnx.ModelProto:
    """The QDQ ONNX model of `graph`: uint8 NHWC pixels [N, H, W, C] -> float32 logits [N, classes].

    int4: 4-bit weights/activations as ONNX INT4/UINT4 (else stored in 8 bits). fold_bias: requantize
    biases go into the conv's int32 bias (ORT's fast QLinearConv path; off by <= half an accumulator step),
    else they are an exact float Add after the conv (closest to the integer graph, no conv fusion).
    split_sums: each conv term of a sum quantized on its own (`_term_codes`), so residual blocks run as
    QLinearConv + QLinearAdd (a second rounding).
    """
    b = _Builder(graph, int4, fold_bias, split_sums)
    b.real[graph.input_name] = INPUT
    for n in graph.nodes:
        convert = CONVERTERS.get(n.op)
        if convert is None:
            raise DFQFError(f"the ONNX export has no converter for op {n.op!r} (node {n.name}); "
                            f"supported: {', '.join(CONVERTERS)}")
        b.real[n.name] = convert(b, n)
    # the output's real value; Identity keeps a fixed output name whatever the last node is
    b.op("Identity", [b.real[graph.output]], OUTPUT)
    h, w, c = graph.input_shape
    out_shape = ["N", *graph.tensors[graph.output].shape]
    g = helper.make_graph(b.nodes, "dfqf_int_graph",
                          [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["N", h, w, c])],
                          [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, out_shape)], b.inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dfqf")
    model.ir_version = IR_VERSION
    return model


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    """Check the model (full shape inference) and write it to `path`."""
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    onnx.save_model(model, str(path))
    return path
