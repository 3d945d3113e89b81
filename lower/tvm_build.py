"""Integer graph (`lower.graph`) -> TVM Relax module -> compiled executable, bit-exact with `lower.reference`.

`build_relax(g)` emits `main(x, *params)`: x is uint8 [n, H, W, C] with a symbolic batch n (one compiled
module serves every batch size), the integer parameters are arguments in `param_order(g)` order, and the
result is int32 [n, classes]. A converter table (`CONVERTERS`) maps each graph op to Relax ops.

Layout. The graph's rank-4 tensors are NCHW; inside main they are NHWC (`internal_axes`): the pixels
arrive NHWC, the VNNI conv reads and writes NHWC, and the integer semantics do not depend on the layout,
so keeping channels last removes a transpose on each side of every conv and makes the per-channel
requantize vectorize along contiguous channels. Only axis-carrying attributes (slice, pad, pooling,
reshape, the channel axis of per-channel parameters) are remapped; a reshape out of rank 4 and a rank-4
graph output go through NCHW so the element order is the graph's.

Exactness. Every op is integer arithmetic with no possible overflow, so TVM matches the NumPy int64
reference bit for bit:
- conv2d/dense: (x - input_zero_point) is formed in int16 (|.| <= 510) *before* the conv's zero padding,
  so padding contributes 0 as the reference says; weights widened to int16; products and sums in int32
  (`lower.integerize` proves the int32 accumulator bound), bias added in int32.
- requantize: terms widened to int64, (t_i - zp_i) * M0[i, c] summed in int64, + offset[c], + 2^(n_c - 1)
  only where n_c > 0, arithmetic right shift by n_c, + output zero point, clip: plain int64 tensor ops with per-channel
  multiplier/shift tensors (not `q_multiply_shift`, which fails with per-channel tensors in TVM 0.27).
- sum_pool2d sums in int32; max_pool2d pads with the storage dtype's minimum (never wins); clamp, slice,
  pad and reshape move values unchanged. Each node's result is cast to its TensorInfo storage dtype
  (uint8/int8/int32), which holds it exactly (the reference checks the value ranges).

Speed. `compile_graph` picks a schedule set from the target's CPU features (`lower.targets.select_schedules`):
on AVX-512 VNNI hosts conv2d runs as a tensorized u8 x s8 vpdpbusd kernel (`lower.schedules.x86_vnni`, exact
form sum(u * w) - zp_u * sum(w) + bias), on other AVX2 hosts as an int16 vpmaddwd kernel
(`lower.schedules.x86_avx2`), each with the following requantize fused in as its epilogue when the conv is
that requantize's term and has no other consumer (`_conv_requantize_pairs`); elsewhere the int16 form above
with TVM's default loops. main
carries num_input=1, so relax LiftTransformParams moves parameter-only work (weight packing, int4 unpack,
per-channel terms) into `main_transform_params`, which `IntegerExecutable.upload` runs once.

int4. TVM 0.27 cannot store int4 tensors, so a weight with weight_bits <= 4 is passed packed in the
`lower.int4` layout (uint8, ceil(size/2) bytes, element 2i in the low nibble of byte i, 2i+1 in the high
nibble, 4-bit two's complement) and unpacked inside the graph: lo = b & 15, hi = b >> 4, interleaved by
stacking [lo, hi] on a new last axis and flattening, cut to `size`, sign-extended in int8 as
v - ((v >> 3) << 4) (v >= 8 -> v - 16), then reshaped to [O, Cin/groups, kh, kw].
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tvm
from tvm import relax, te
from tvm.relax import op as R

from core.errors import DFQFError

from .graph import IntGraph, Node
from .params import pack_params, packed_param, param_order
from .schedules import ScheduleSet
from .targets import make_target, relax_pipeline, select_schedules

__all__ = ["CONVERTERS", "GraphBuilder", "build_relax", "compile_graph", "export_library", "pack_params",
           "param_order"]

# -- building the Relax module --------------------------------------------------------------------------
def _const(value: int, dtype: str) -> relax.Constant:
    """A scalar constant; the dtype is always explicit (relax.const of int64 data silently makes int32)."""
    return relax.const(np.array(value, dtype=dtype), dtype)


def _dtype(e: relax.Expr) -> str:
    return str(e.ty.dtype)


def _cast(e: relax.Expr, dtype: str) -> relax.Expr:
    return e if _dtype(e) == dtype else R.astype(e, dtype)


NHWC = (0, 3, 1, 2)  # graph (NCHW) axis -> internal axis, for rank-4 tensors


def internal_axes(rank: int) -> tuple[int, ...]:
    """internal_axes(rank)[a]: where the graph's axis `a` of a rank-`rank` tensor lives inside main."""
    return NHWC if rank == 4 else tuple(range(rank))


def to_graph_layout(x: relax.Expr, rank: int) -> relax.Expr:
    """An internal tensor in the graph's own axis order (NCHW for rank 4)."""
    return R.permute_dims(x, list(internal_axes(rank))) if rank == 4 else x


def to_internal_layout(x: relax.Expr, rank: int) -> relax.Expr:
    return R.permute_dims(x, [0, 2, 3, 1]) if rank == 4 else x


class GraphBuilder:
    """What a converter sees: the BlockBuilder, the graph, the batch size and the parameter variables."""

    def __init__(self, g: IntGraph, schedules: ScheduleSet | None = None, tiles: dict[str, tuple[int, int]] | None = None,
                 kernels: dict | None = None) -> None:
        self.bb = relax.BlockBuilder()
        self.graph = g
        self.schedules = schedules  # hand-scheduled kernels, or None: default loops only
        self.tiles = tiles or {}  # kernel key -> register tile (`lower.tune`); others: the default tile
        self.kernels = kernels  # when a dict: filled with kernel key -> x86_conv.KernelRequest
        self.batch = tvm.tirx.Var("n", "int64")
        h, w, c = g.input_shape
        self.x = relax.Var("x", relax.TensorType([self.batch, h, w, c], "uint8"))
        self.params = {key: relax.Var(key.replace("/", "__"), relax.TensorType(shape, dtype))
                       for key, shape, dtype in param_order(g)}

    def emit(self, e: relax.Expr) -> relax.Var:
        return self.bb.emit(e)

    def param(self, node: Node, key: str) -> relax.Expr:
        """A node's parameter in the shape of `node.params[key]` (a view of the node, e.g. a dense as a 1x1 conv,
        may reshape it); packed int4 weights are unpacked to int8."""
        var = self.params[f"{node.name}/{key}"]
        shape = tuple(int(d) for d in np.shape(node.params[key]))
        if packed_param(node, key):
            return self.unpack_int4(var, shape)
        return var if tuple(int(d) for d in var.ty.shape) == shape else self.emit(R.reshape(var, list(shape)))

    def unpack_int4(self, packed: relax.Expr, shape: tuple[int, ...]) -> relax.Expr:
        size, nbytes = int(np.prod(shape)), (int(np.prod(shape)) + 1) // 2
        lo = R.bitwise_and(packed, _const(15, "uint8"))
        hi = R.right_shift(packed, _const(4, "uint8"))
        nib = self.emit(R.reshape(R.stack([lo, hi], axis=1), [2 * nbytes]))
        if size != 2 * nbytes:
            nib = self.emit(R.strided_slice(nib, [0], [0], [size]))
        v = R.astype(nib, "int8")
        v = R.subtract(v, R.left_shift(R.right_shift(v, _const(3, "int8")), _const(4, "int8")))
        return self.emit(R.reshape(v, list(shape)))

    def per_channel(self, v: relax.Expr, rank: int) -> relax.Expr:
        """[C] -> the shape that broadcasts along the channel axis (graph axis 1) of a rank-`rank` tensor
        in main's internal layout: [1, 1, 1, C] for NHWC, [1, C, 1, ...] otherwise."""
        shape = [1] * rank
        shape[internal_axes(rank)[1]] = -1
        return R.reshape(self.emit(v), shape)


def _quantize_input(b: GraphBuilder, n: Node, xs: list[relax.Expr]) -> relax.Expr:
    """out[n, c, h, w] = lut[c, x[n, h, w, c]] as a gather from the flattened [C * 256] table (NHWC inside).

    The table is cast to the output's storage dtype first (its entries are output values), so the gather
    moves bytes; "clip" mode only silences TVM's warning: the indices are in range by construction.
    """
    c = int(np.shape(n.params["lut"])[0])
    flat = R.astype(R.reshape(b.param(n, "lut"), [c * 256]), b.graph.tensors[n.name].dtype)
    index = R.add(R.astype(xs[0], "int32"), relax.const(np.arange(c, dtype=np.int32) * 256, "int32"))
    return R.take(flat, index, axis=0, mode="clip")


def _centered(x: relax.Expr, zero_point: int) -> tuple[relax.Expr, str]:
    """(x - zero_point, its dtype): int16 for 8-bit storage (|x - zp| < 2^15 for any 8-bit zp), else int32."""
    dtype = "int16" if _dtype(x) in ("uint8", "int8") and -(2**15) + 255 <= zero_point <= 2**15 - 256 else "int32"
    x = _cast(x, dtype)
    return (R.subtract(x, _const(zero_point, dtype)) if zero_point else x), dtype


def _conv2d(b: GraphBuilder, n: Node, xs: list[relax.Expr]) -> relax.Expr:
    if b.schedules is not None:  # a hand-scheduled kernel, when the set covers this conv
        acc = b.schedules.emit_conv2d(b, n, xs[0])
        if acc is not None:
            return acc
    a = n.attrs
    x, dtype = _centered(xs[0], int(a["input_zero_point"]))
    acc = R.nn.conv2d(x, _cast(b.param(n, "weight"), dtype), strides=list(a["stride"]),
                      padding=list(a["padding"]), dilation=list(a["dilation"]), groups=int(a["groups"]),
                      data_layout="NHWC", kernel_layout="OIHW", out_dtype="int32")
    return R.add(acc, b.per_channel(b.param(n, "bias"), 4))


def _dense(b: GraphBuilder, n: Node, xs: list[relax.Expr]) -> relax.Expr:
    if b.schedules is not None:  # a 1x1 conv on a 1x1 image, when the set covers it
        acc = b.schedules.emit_dense(b, n, xs[0])
        if acc is not None:
            return acc
    x, dtype = _centered(xs[0], int(n.attrs["input_zero_point"]))
    acc = R.matmul(x, R.permute_dims(_cast(b.param(n, "weight"), dtype), [1, 0]), out_dtype="int32")
    return R.add(acc, R.reshape(b.param(n, "bias"), [1, -1]))


def _requantize(b: GraphBuilder, n: Node, xs: list[relax.Expr]) -> relax.Expr:
    a = n.attrs
    rank = len(b.graph.tensors[n.inputs[0]].shape) + 1
    multiplier, shift = b.param(n, "multiplier"), b.param(n, "shift")
    acc = None
    for i, (t, zp) in enumerate(zip(xs, a["input_zero_points"])):
        t = _cast(t, "int64")
        if int(zp):
            t = R.subtract(t, _const(int(zp), "int64"))
        m = b.per_channel(R.strided_slice(multiplier, [0], [i], [i + 1]), rank)
        term = R.multiply(t, m)
        acc = term if acc is None else R.add(acc, term)
    acc = R.add(acc, b.per_channel(b.param(n, "offset"), rank))
    s = b.emit(b.per_channel(shift, rank))
    half = R.left_shift(_const(1, "int64"), R.maximum(R.subtract(s, _const(1, "int64")), _const(0, "int64")))
    rounding = R.where(R.greater(s, _const(0, "int64")), half, _const(0, "int64"))
    y = R.right_shift(R.add(acc, rounding), s)
    if int(a["output_zero_point"]):
        y = R.add(y, _const(int(a["output_zero_point"]), "int64"))
    return R.clip(y, int(a["qmin"]), int(a["qmax"]))


def _sum_pool2d(b: GraphBuilder, n: Node, xs: list[relax.Expr]) -> relax.Expr:
    if b.schedules is not None:
        return b.schedules.emit_pool(b, n, xs[0])
    (kh, kw), (sh, sw) = n.attrs["kernel"], n.attrs["stride"]

    def window_sum(x: te.Tensor) -> te.Tensor:  # NHWC
        batch, h, w, c = x.shape
        rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
        return te.compute((batch, (h - kh) // sh + 1, (w - kw) // sw + 1, c),
                          lambda i, y, z, j: te.sum(x[i, y * sh + rh, z * sw + rw, j].astype("int32"), axis=[rh, rw]),
                          name="sum_pool2d")

    return b.bb.emit_te(window_sum, xs[0], primfunc_name_hint="sum_pool2d")


def _max_pool2d(b: GraphBuilder, n: Node, xs: list[relax.Expr]) -> relax.Expr:
    if b.schedules is not None:
        return b.schedules.emit_pool(b, n, xs[0])
    a = n.attrs
    return R.nn.max_pool2d(xs[0], pool_size=list(a["kernel"]), strides=list(a["stride"]),
                           padding=list(a["padding"]), layout="NHWC")


def _clamp(b: GraphBuilder, n: Node, xs: list[relax.Expr]) -> relax.Expr:
    return R.clip(xs[0], int(n.attrs["qmin"]), int(n.attrs["qmax"]))


def _strided_slice(b: GraphBuilder, n: Node, xs: list[relax.Expr]) -> relax.Expr:
    """Python slice semantics per axis; static shapes let us resolve negative/out-of-range bounds here."""
    a = n.attrs
    shape = (None, *b.graph.tensors[n.inputs[0]].shape)
    axes = internal_axes(len(shape))
    x = xs[0]
    for axis, (begin, end, step) in enumerate(zip(a["begin"], a["end"], a["step"])):
        if axis == 0:
            if (begin or 0) != 0 or (step or 1) != 1 or (end is not None and end < 2**31 - 1):
                raise DFQFError(f"{n.name}: slicing the batch axis is not supported by the TVM lowering")
            continue
        start, stop, stride = slice(begin, end, step).indices(shape[axis])
        if (start, stop, stride) == (0, shape[axis], 1):
            continue
        if stride > 0:
            x = R.strided_slice(x, [axes[axis]], [start], [max(stop, start)], [stride])
        else:  # a reversed range: gather the indices (relax would wrap a stop of -1)
            index = np.arange(start, stop, stride, dtype=np.int64)
            x = R.take(x, relax.const(index, "int64"), axis=axes[axis])
    return x


def _pad(b: GraphBuilder, n: Node, xs: list[relax.Expr]) -> relax.Expr:
    pads = [[int(p) for p in ab] for ab in n.attrs["pads"]]
    if pads[0] != [0, 0]:
        raise DFQFError(f"{n.name}: padding the batch axis is not supported by the TVM lowering")
    axes = internal_axes(len(pads))
    pads = [pads[axes.index(i)] for i in range(len(pads))]  # internal axis i holds graph axis axes.index(i)
    # relax takes the pad value as a C++ double: exact for every int32 value
    return R.nn.pad(xs[0], [p for ab in pads for p in ab], "constant", float(n.attrs["value"]))


def _reshape(b: GraphBuilder, n: Node, xs: list[relax.Expr]) -> relax.Expr:
    """A reshape is defined on the graph's (NCHW) element order: leave and re-enter the internal layout."""
    x = to_graph_layout(xs[0], len(b.graph.tensors[n.inputs[0]].shape) + 1)
    shape = b.graph.tensors[n.name].shape
    return to_internal_layout(R.reshape(x, [b.batch, *shape]), len(shape) + 1)


Converter = Callable[[GraphBuilder, Node, list[relax.Expr]], relax.Expr]
CONVERTERS: dict[str, Converter] = {
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


def _conv_requantize_pairs(g: IntGraph) -> dict[str, Node]:
    """requantize name -> the conv2d whose only consumer it is (and that it reads once): pairs a schedule set
    may emit as one kernel (`emit_conv2d_requantize`), so the int32 accumulator never reaches memory."""
    consumers: dict[str, list[Node]] = {}
    for n in g.nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n)
    pairs = {}
    for n in g.nodes:
        users = consumers.get(n.name, [])
        if n.op == "conv2d" and n.name != g.output and len(users) == 1 and users[0].op == "requantize" \
                and users[0].inputs.count(n.name) == 1:
            pairs[users[0].name] = n
    return pairs


def build_relax(g: IntGraph, schedules: ScheduleSet | None = None, tiles: dict[str, tuple[int, int]] | None = None,
                kernels: dict | None = None) -> tvm.IRModule:
    """The Relax module of `g`: main(x: uint8 [n, H, W, C], *params in param_order(g)) -> int32 [n, ...].

    schedules: a `lower.schedules.ScheduleSet` whose kernels replace the default ops they cover; tiles: kernel
    key -> register tile of those kernels (`lower.tune`; default tile for the others); kernels: a dict to
    fill with kernel key -> `x86_conv.KernelRequest` of every hand-scheduled kernel built."""
    missing = sorted({n.op for n in g.nodes if n.op not in CONVERTERS})
    if missing:
        raise DFQFError(f"the TVM lowering has no converter for {', '.join(missing)}; "
                        f"supported: {', '.join(CONVERTERS)}")
    b = GraphBuilder(g, schedules, tiles, kernels)
    fusable = _conv_requantize_pairs(g) if schedules is not None else {}
    deferred = {conv.name: conv for conv in fusable.values()}
    with b.bb.function("main", [b.x, *b.params.values()]):
        with b.bb.dataflow():
            env: dict[str, relax.Expr] = {g.input_name: b.x}

            def emit_node(n: Node) -> None:
                y = b.emit(CONVERTERS[n.op](b, n, [env[i] for i in n.inputs]))
                storage = g.tensors[n.name].dtype
                env[n.name] = y if _dtype(y) == storage else b.emit(R.astype(y, storage))

            for n in g.nodes:
                if n.name in deferred:  # emitted with its requantize (which comes later in graph order)
                    continue
                conv = fusable.get(n.name)
                if conv is not None:
                    terms = [None if i == conv.name else env[i] for i in n.inputs]
                    y = b.schedules.emit_conv2d_requantize(b, conv, n, env[conv.inputs[0]], terms)
                    if y is not None:
                        env[n.name] = b.emit(y)
                        continue
                    emit_node(conv)  # the schedule set cannot fuse this pair: the two ops, one by one
                emit_node(n)
            out = b.emit(to_graph_layout(env[g.output], len(g.tensors[g.output].shape) + 1))
            out = b.bb.emit_output(_cast(out, "int32"))
        b.bb.emit_func_output(out)
    mod = b.bb.get()
    mod["main"] = mod["main"].with_attr("num_input", 1)  # the rest are parameters (LiftTransformParams)
    return mod


# -- compiling, exporting, loading ------------------------------------------------------------------------
def compile_graph(g: IntGraph, target: str = "llvm", *, schedules: str = "auto",
                  tiles: dict[str, tuple[int, int]] | None = None, **opts: Any) -> relax.VMExecutable:
    """Compile `g` for `target` (a key of `lower.targets.TARGETS`; opts e.g. mcpu=..., arch='sm_90').

    schedules: "auto" (the set `lower.targets.select_schedules` picks from the target's CPU features),
    "none" (TVM's default loops), or a set's name; tiles: as `build_relax`'s."""
    mod, tvm_target = _relax_for(g, target, schedules, tiles, opts)
    return tvm.compile(mod, target=tvm_target, relax_pipeline=relax_pipeline(target))


def _relax_for(g: IntGraph, target: str, schedules: str, tiles: dict[str, tuple[int, int]] | None,
               opts: dict[str, Any]) -> tuple[tvm.IRModule, tvm.target.Target]:
    """The Relax module of `g` with the schedule set `schedules` resolves to on `target`, and the TVM target."""
    tvm_target = make_target(target, **opts)
    return build_relax(g, select_schedules(target, tvm_target, schedules), tiles), tvm_target


def default_loop_kernels(g: IntGraph, target: str = "llvm", *, schedules: str = "auto", **opts: Any) -> list[str]:
    """The kernels that `compile_graph(g, target, schedules=...)` would run on TVM's default loops: the PrimFuncs
    that `main` calls after the target's Relax pipeline and that neither a schedule set nor the elementwise
    rule scheduled (parameter-only work, run once at upload, is not counted)."""
    mod, tvm_target = _relax_for(g, target, schedules, None, opts)
    with tvm_target:
        mod = relax_pipeline(target)(mod)
    called = {gv.name_hint for gv in relax.analysis.all_global_vars(mod["main"])}

    def flag(f: tvm.tirx.PrimFunc, key: str) -> bool:
        return bool(f.attrs is not None and int(f.attrs.get(key, 0)))

    return sorted(gv.name_hint for gv, f in mod.functions.items()  # VMShapeLower's shape_func is host code
                  if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint in called
                  and not flag(f, "tirx.is_scheduled") and not flag(f, "tirx.is_host_func"))


def export_library(executable: relax.VMExecutable, path: str | os.PathLike) -> Path:
    """Write a shared library (host code plus any device modules) that `load_executable` can load."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    executable.export_library(str(path))
    return path
