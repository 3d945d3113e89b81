"""Register-tiled direct conv2d for x86 SIMD dot-product instructions: what `x86_vnni` (AVX-512 VNNI) and
`x86_avx2` (AVX2) share.

A kernel family (one module) supplies the conv compute, whose block is named "conv" and has the loops
(n, y, z, out_block, lane, r, s, rc, *inner reduction), a tensor intrinsic that computes `lanes` output
channels x 4 input channels of one output pixel, and `prepare(b, node, x)`: the kernel's input and zero
point, packed weight and bias as Relax values. This module gives it the rest:

- `padded_input`: the kernel reads the unpadded activation and forms the padded (and, per family, converted)
  input rows itself, so no conv needs a separate pad kernel or a padded copy of its input in memory;
- `requantize_epilogue` (from `x86_requant`, with `Epilogue` and its arithmetic): the graph's requantize as the
  kernel's epilogue, so one kernel per conv writes the 8-bit activation and the int32 accumulator never
  reaches memory;
- `schedule`: parallel over batch x blocks of up to `ROWS_PER_TASK` output rows (each block first computes the
  padded input rows it reads: (rows + kh - 1) / rows times the input instead of kh times for one row per
  task), output column tiles, then the reduction, then the register tile
  of columns x channel blocks (unrolled; at most `max_acc` vector accumulators, held in a "local" buffer
  that LLVM keeps in registers), then the tensorized dot; after the reduction, the tile's store or epilogue;
- `emit_conv2d` / `emit_conv2d_requantize`: the Relax glue, for `lower.tvm_build`'s schedule-set interface.
  Each kernel has a `kernel_key`; the builder's `tiles` (from `lower.tune`) may override its register tile,
  and the builder's `kernels` (when not None) records every kernel it asks for.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
from tvm import relax, te, tirx
from tvm.relax import op as R
from tvm.s_tir import Schedule

from core.errors import DFQFError

from ..graph import Node, TensorInfo
from .x86_requant import Epilogue, requantize_epilogue, requantize_value  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from ..tvm_build import GraphBuilder

OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps leaves the scheduled kernel alone
MAX_EXACT = 2**31 - 1
# Output rows per parallel task: the padded input rows they read are formed once per task. A map of at most
# 8 rows is one task per image (ResNet20's 8x8 layer3; small batches run on one thread anyway,
# `lower.tvm_build.PARALLEL_MIN_MACS`).
ROWS_PER_TASK = 8


def out_hw(in_hw, kernel, stride, dilation) -> tuple[int, int]:
    return tuple((i - (k - 1) * d - 1) // s + 1 for i, k, s, d in zip(in_hw, kernel, stride, dilation))


def supports(node: Node, input_dtype: str) -> bool:
    """Whether `node` (a conv2d) runs exactly on a kernel of this family: 8-bit input storage with its zero
    point representable as uint8 after the +128 shift of int8 inputs, one group, and no int32 overflow in
    sum(u * w) - zp_u * sum(w) + bias (u = the uint8 input; the AVX2 form sum((x - zp) * w) + bias has the
    same bound)."""
    a = node.attrs
    if input_dtype not in ("uint8", "int8") or int(a["groups"]) != 1:
        return False
    zp_u = int(a["input_zero_point"]) + (128 if input_dtype == "int8" else 0)
    o, cin, kh, kw = np.shape(node.params["weight"])
    w_max = 2 ** (int(a["weight_bits"]) - 1)
    bias_max = int(np.abs(np.asarray(node.params["bias"], np.int64)).max(initial=0))
    return 0 <= zp_u <= 255 and 2 * 255 * w_max * cin * kh * kw + bias_max <= MAX_EXACT


def tiles_by_preference(ow: int, out_blocks: int, max_acc: int) -> list[tuple[int, int]]:
    """Every register tile (output columns, channel blocks) with the columns dividing OW and the blocks
    dividing out_blocks (no remainder tiles) within `max_acc` accumulators, best first: the most dot products
    per load of a reduction step (zt * obt products need zt broadcasts and obt weight vectors), then the most
    accumulators. (Ranking by accumulators first chose 1 x 16 for ResNet18's 7-column 512-channel convs: 16
    weight loads per 16 products, 46 GMAC/s against 213 for 7 x 2.)"""
    fits = [(zt, obt) for obt in range(1, out_blocks + 1) for zt in range(1, ow + 1)
            if not out_blocks % obt and not ow % zt and zt * obt <= max_acc]
    return sorted(fits, key=lambda t: (t[0] * t[1] / (t[0] + t[1]), t[0] * t[1], t[0]), reverse=True)


def register_tile(ow: int, out_blocks: int, max_acc: int) -> tuple[int, int]:
    """The default register tile: the first of `tiles_by_preference`."""
    return tiles_by_preference(ow, out_blocks, max_acc)[0]


def padded_input(batch, in_hw: tuple[int, int], padding: tuple[int, int], cin: int, in_dtype: str, dtype: str,
                 value: Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr] | None,
                 fill: Callable[[tirx.PrimExpr], tirx.PrimExpr]) -> tuple[list[te.Tensor], te.Tensor]:
    """The kernel's inputs x [batch, H, W, cin] `in_dtype` (cin % 4 == 0) and zero_point int32 [1], and what the
    conv reads: [batch, H + 2 ph, W + 2 pw, cin] `dtype` holding value(x, zero_point) (x itself for None)
    inside and fill(zero_point) in the spatial padding. The padding is a stage of the kernel: `schedule`
    computes the rows each parallel task reads at the start of the task, so there is no separate pad kernel
    and no padded copy of the activation in memory. Where nothing needs padding or converting, the conv
    reads x itself."""
    (h, w), (ph, pw) = in_hw, padding
    x = te.placeholder((batch, h, w, cin), in_dtype, name="x")
    zp = te.placeholder((1,), "int32", name="zero_point")
    if (ph, pw) == (0, 0) and value is None:
        return [x, zp], x

    def stage(n, i, j, c):
        v = x[n, i - ph, j - pw, c]
        v = v if value is None else value(v, zp[0])
        if (ph, pw) == (0, 0):
            return v
        return tirx.if_then_else(tirx.all(i >= ph, i < h + ph, j >= pw, j < w + pw), v, fill(zp[0]))

    return [x, zp], te.compute((batch, h + 2 * ph, w + 2 * pw, cin), stage, name="pad")


def padded_int16_input(batch, shape: ConvShape) -> tuple[list[te.Tensor], te.Tensor]:
    """`padded_input` as the AVX2 conv reads it: x - zero_point widened to int16,
    zeros in the padding."""
    return padded_input(batch, shape.in_hw, shape.padding, shape.cin, shape.in_dtype, "int16",
                        lambda v, zp: v.astype("int16") - zp.astype("int16"), lambda zp: tirx.const(0, "int16"))


def kernel_func(args: list[te.Tensor], conv: te.Tensor, batch, oh: int, ow: int, lanes: int,
                epilogue: Epilogue | None, name: str) -> tirx.PrimFunc:
    """The unscheduled PrimFunc: conv's inputs `args`, then either the int32 store or the epilogue."""
    if epilogue is None:
        c = conv.shape[3] * lanes
        out = te.compute((batch, oh, ow, c), lambda n, y, z, ch: conv[n, y, z, ch // lanes, ch % lanes],
                         name="store")
    else:
        out, extra = requantize_epilogue(conv, epilogue, batch, oh, ow, lanes)
        args = [*args, *extra]
    return te.create_prim_func([*args, out]).with_attr("global_symbol", name)


def schedule(func: tirx.PrimFunc, intrinsic: str, tile: tuple[int, int], lanes: int, fused: bool,
             epilogue_intrinsic: str | None = None) -> tirx.PrimFunc:
    """The register-tiled schedule (module docstring) of a `kernel_func`, tensorized with `intrinsic`;
    fused: whether it was built with an epilogue, tensorized with `epilogue_intrinsic` if given (`x86_requant`)
    and vectorized otherwise."""
    sch = Schedule(func)
    blk = sch.get_sblock("conv")
    n, y, z, ob, oi, r_, s_, rc_, *inner = sch.get_loops(blk)
    zt, obt = tile
    zo, zi = sch.split(z, [None, zt])
    obo, obi = sch.split(ob, [None, obt])
    oh = int(sch.get(y).extent)
    yo, yi = sch.split(y, [None, max(d for d in range(1, min(oh, ROWS_PER_TASK) + 1) if not oh % d)])
    sch.reorder(n, yo, yi, zo, obo, r_, s_, rc_, zi, obi, oi, *inner)
    # Accumulate the register tile in a "local" buffer consumed once per tile (by the write-back or the
    # epilogue): with every index constant after unrolling, LLVM keeps it in vector registers instead of
    # loading and storing the output at every reduction step.
    consumer = sch.get_sblock("requantize" if fused else "store")
    sch.set_scope(blk, 0, "local")
    sch.reverse_compute_at(consumer, obo)
    *_, c_zi, c_ch = sch.get_loops(consumer)
    c_obi, c_oi = sch.split(c_ch, [None, lanes])
    if epilogue_intrinsic is not None:  # before the fuse: an int64 batch fused with the int32 rows gives the
        sch.tensorize(c_oi, epilogue_intrinsic)  # block a cast binding that blockize cannot divide
    rows = sch.fuse(n, yo)
    sch.parallel(rows)
    if any(sch.get(blk).name_hint == "pad" for blk in sch.get_child_blocks(sch.get_sblock("root"))):
        pad = sch.get_sblock("pad")  # the padded input rows the task's output rows read, once per task
        sch.compute_at(pad, rows)
        sch.vectorize(sch.get_loops(pad)[-1])
    init = sch.decompose_reduction(blk, r_)
    i_zi, i_obi, i_oi = sch.get_loops(init)[-3:]
    sch.vectorize(i_oi)
    if epilogue_intrinsic is None:
        sch.vectorize(c_oi)
    for loop in (i_zi, i_obi, c_zi, c_obi, zi, obi):
        sch.unroll(loop)
    sch.tensorize(oi, intrinsic)
    return sch.mod["main"]


# -- the Relax glue --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvShape:
    """What one conv kernel is built for, besides its symbolic batch: the unpadded input size and its padding,
    the input channels (padded to a multiple of 4) and dtype, the 16- or 8-channel output blocks, kernel,
    stride and dilation. Equal shapes (and epilogues) are one kernel (`kernel_key`)."""

    in_hw: tuple[int, int]
    padding: tuple[int, int]
    cin: int
    in_dtype: str
    out_blocks: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def output_hw(self) -> tuple[int, int]:
        """(OH, OW) of the kernel's output."""
        padded = tuple(i + 2 * p for i, p in zip(self.in_hw, self.padding))
        return out_hw(padded, self.kernel, self.stride, self.dilation)


@dataclass(frozen=True)
class KernelInputs:
    """What a family's `prepare` gives the kernel call for one conv node: the input x and its zero point, the
    packed weight `wp`, the bias padded to `o_pad` channels (O of the node), and the kernel's `shape`."""

    x: relax.Expr
    zp: relax.Expr
    wp: relax.Expr
    bias: relax.Expr
    o: int
    o_pad: int
    shape: ConvShape


KernelBuilder = Callable[..., tirx.PrimFunc]  # (batch, ConvShape, epilogue=, tile=) -> scheduled PrimFunc


@dataclass(frozen=True)
class Family:
    """A kernel family: `prepare(b, node, x)` -> its `KernelInputs`, or None when the kernel cannot run `node`
    exactly; `kernel(batch, shape, epilogue=, tile=)` -> the scheduled PrimFunc; `lanes` output channels per
    block; `suffix` names the kernels (e.g. "conv2d_vnni"); `max_acc` vector accumulators a register tile may
    hold; `tunable`: whether `lower.tune` searches its register tile (the AMX kernel's tile blocking is fixed);
    `hi32_epilogue`: whether its fused epilogues where every shift is >= 32 use `Epilogue.hi32`."""

    prepare: Callable[..., KernelInputs | None]  # (b, node, x, in_info=None)
    kernel: KernelBuilder
    lanes: int
    suffix: str
    max_acc: int
    tunable: bool = True
    hi32_epilogue: bool = False  # the kernel takes `Epilogue.hi32` (the `x86_requant` epilogue) where it applies


@dataclass
class KernelRequest:
    """One distinct kernel a graph asks for: its family, shape, epilogue, and the conv nodes that use it."""

    family: Family
    shape: ConvShape
    epilogue: Epilogue | None
    nodes: list[str] = field(default_factory=list)

    @property
    def output_hw(self) -> tuple[int, int]:
        return self.shape.output_hw

    @property
    def tile_extents(self) -> tuple[int, int]:
        """(OW, out_blocks): the extents the register tile divides."""
        return self.output_hw[1], self.shape.out_blocks

    @property
    def key(self) -> str:
        return kernel_key(self.family, self.shape, self.epilogue)


def kernel_key(f: Family, shape: ConvShape, epilogue: Epilogue | None) -> str:
    """A stable name of a kernel: family, shape (in_hw, padding, cin, in_dtype, out_blocks, kernel, stride,
    dilation) and epilogue, as compact JSON."""
    spec = {"family": f.suffix, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(shape).items()},
            "epilogue": None if epilogue is None else asdict(epilogue)}
    return json.dumps(spec, separators=(",", ":"), default=list)


def check_tile(f: Family, ow: int, out_blocks: int, tile: tuple[int, int]) -> tuple[int, int]:
    """`tile` as (int, int) if it divides (OW, out_blocks) within `f.max_acc` accumulators, else a DFQFError."""
    zt, obt = (int(t) for t in tile)
    if zt < 1 or obt < 1 or ow % zt or out_blocks % obt or zt * obt > f.max_acc:
        raise DFQFError(f"register tile {[zt, obt]} does not fit a {f.suffix} kernel with {ow} output columns and "
                        f"{out_blocks} channel blocks (at most {f.max_acc} accumulators)")
    return zt, obt


@dataclass(frozen=True)
class ConvGeometry:
    """What every family's `prepare` needs of a conv2d node: its sizes and input dtype, with Cin padded to 4
    and O to `lanes`."""

    o: int
    cin: int
    kh: int
    kw: int
    padding: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    in_hw: tuple[int, int]
    in_dtype: str
    cin4: int
    o_pad: int

    def kernel_inputs(self, b: "GraphBuilder", x: relax.Expr, zero_point: int, wp: relax.Expr, bias: relax.Expr,
                      lanes: int) -> KernelInputs:
        """The `KernelInputs` of `Family.prepare`: x (channels padded to Cin4) and its zero point, the packed
        weight, the bias padded to O_pad channels, the kernel's shape."""
        if self.cin4 != self.cin:  # the padded channels meet zero filters: any value will do
            x = b.emit(R.nn.pad(x, [0, 0, 0, 0, 0, 0, 0, self.cin4 - self.cin], "constant", 0.0))
        shape = ConvShape(self.in_hw, self.padding, self.cin4, self.in_dtype, self.o_pad // lanes, (self.kh, self.kw),
                          self.stride, self.dilation)
        return KernelInputs(x, relax.const(np.array([zero_point], np.int32), "int32"), wp,
                            b.emit(R.nn.pad(bias, [0, self.o_pad - self.o], "constant", 0.0)), self.o, self.o_pad,
                            shape)


def geometry(b: "GraphBuilder", node: Node, lanes: int, in_info: TensorInfo | None = None) -> ConvGeometry | None:
    """conv2d `node`'s `ConvGeometry` (its input described by `in_info`, default the graph's tensor), or None when
    a kernel of this family cannot run it exactly (`supports`)."""
    in_info = in_info or b.graph.tensors[node.inputs[0]]
    if not supports(node, in_info.dtype):
        return None
    a = node.attrs
    o, cin, kh, kw = (int(d) for d in np.shape(node.params["weight"]))
    _, h, w = in_info.shape
    return ConvGeometry(o, cin, kh, kw, tuple(int(p) for p in a["padding"]), tuple(a["stride"]),
                        tuple(a["dilation"]), (h, w), in_info.dtype, -(-cin // 4) * 4, -(-o // lanes) * lanes)


def _kernel(b: "GraphBuilder", f: Family, node: Node, k: KernelInputs, epilogue: Epilogue | None = None
            ) -> tirx.PrimFunc:
    """The scheduled kernel for `node`, with the builder's tile for its key (default tile otherwise); records
    the request in `b.kernels` when the builder keeps one."""
    request = KernelRequest(f, k.shape, epilogue)
    if b.kernels is not None:
        request = b.kernels.setdefault(request.key, request)
        request.nodes.append(node.name)
    tile = b.tiles.get(request.key) if f.tunable else None
    tile = None if tile is None else check_tile(f, *request.tile_extents, tile)
    return f.kernel(b.batch, k.shape, epilogue=epilogue, tile=tile)


def _call(b: "GraphBuilder", f: Family, node: Node, func: tirx.PrimFunc, args: list, dtype: str, k: KernelInputs
          ) -> relax.Expr:
    """Call the kernel; [n, OH, OW, O_pad] -> [n, OH, OW, O] (dropping padded channels)."""
    gv = b.bb.add_func(func.with_attrs({"op_pattern": OPAQUE, "tirx.is_scheduled": True}), f"{node.name}_{f.suffix}")
    oh, ow = k.shape.output_hw
    out = b.emit(relax.call_tir(gv, args, relax.TensorType([b.batch, oh, ow, k.o_pad], dtype)))
    return R.strided_slice(out, [3], [0], [k.o]) if k.o_pad != k.o else out


def emit_conv2d(f: Family, b: "GraphBuilder", node: Node, x: relax.Expr, in_info: TensorInfo | None = None
                ) -> relax.Expr | None:
    """acc [n, OH, OW, O] int32 of conv2d `node` on x [n, H, W, Cin] (the builder's NHWC; `in_info`: its
    TensorInfo when it is not the graph's), or None if the kernel cannot run it."""
    k = f.prepare(b, node, x, in_info)
    if k is None:
        return None
    acc = _call(b, f, node, _kernel(b, f, node, k), [k.x, k.zp, k.wp], "int32", k)
    return R.add(acc, b.per_channel(R.strided_slice(k.bias, [0], [0], [k.o]), 4))


def emit_conv2d_requantize(f: Family, b: "GraphBuilder", conv: Node, rq: Node, x: relax.Expr,
                           terms: list[relax.Expr | None]) -> relax.Expr | None:
    """requantize `rq` of conv2d `conv` (its term terms.index(None)) and residual `terms`, as one kernel;
    [n, OH, OW, O] in rq's storage dtype, or None when the kernel cannot run it (the builder then emits the
    two ops separately)."""
    g = b.graph
    o = int(np.shape(conv.params["weight"])[0])
    j = terms.index(None)
    residuals = [i for i in range(len(terms)) if i != j]
    if residuals and o % f.lanes:  # residuals are read at the padded channel index
        return None
    if any(tuple(g.tensors[rq.inputs[i]].shape) != tuple(g.tensors[conv.name].shape) for i in residuals):
        return None  # broadcasting terms: the plain requantize handles them
    channels = int(np.shape(rq.params["shift"])[0])
    if channels not in (1, o) or int(np.max(rq.params["multiplier"], initial=0)) > MAX_EXACT \
            or int(np.min(rq.params["multiplier"], initial=0)) < -MAX_EXACT:
        return None  # the multipliers are passed as int32
    k = f.prepare(b, conv, x)
    if k is None:
        return None
    o_pad = k.o_pad

    def per_out_channel(v: relax.Expr, rows: int | None = None, fill: float = 0.0) -> relax.Expr:
        """[C] or [rows, C] with C = 1 or O -> [O_pad] / [rows, O_pad] (padded channels: `fill`)."""
        shape = [o] if rows is None else [rows, o]
        v = R.broadcast_to(v, shape) if channels == 1 else v
        return R.nn.pad(v, [0, 0] * (len(shape) - 1) + [0, o_pad - o], "constant", fill)

    a = rq.attrs
    order = [j, *residuals]  # the conv term first
    zps = relax.const(np.array([int(a["input_zero_points"][i]) for i in order], np.int64).reshape(-1, 1), "int64")
    mult = per_out_channel(R.take(b.param(rq, "multiplier"), relax.const(np.array(order, np.int64), "int64"),
                                  axis=0, mode="clip"), len(terms))  # int64 [1 + R, O_pad]
    hi32 = f.hi32_epilogue and int(np.min(rq.params["shift"])) >= 32 and len(residuals) <= 1
    shift = b.emit(per_out_channel(b.param(rq, "shift"), fill=32.0 if hi32 else 0.0))  # padded: a valid shift
    one, zero = relax.const(np.int64(1), "int64"), relax.const(np.int64(0), "int64")
    rounding = R.where(R.greater(shift, zero), R.left_shift(one, R.maximum(R.subtract(shift, one), zero)), zero)
    offset = R.subtract(R.add(per_out_channel(b.param(rq, "offset")), rounding),
                        R.sum(R.multiply(mult, zps), axis=[0]))
    m0 = R.squeeze(R.strided_slice(mult, [0], [0], [1]), [0])  # the conv term's multiplier
    offset = R.add(offset, R.multiply(R.astype(k.bias, "int64"), m0))  # + b * M_0 (`x86_requant` docstring)
    dtype = g.tensors[rq.name].dtype
    epilogue = Epilogue(tuple(g.tensors[rq.inputs[i]].dtype for i in residuals), int(a["output_zero_point"]),
                        int(a["qmin"]), int(a["qmax"]), dtype, hi32)
    func = _kernel(b, f, conv, k, epilogue)
    args = [k.x, k.zp, k.wp, b.emit(R.astype(mult, "int32")), b.emit(offset), shift,
            *(terms[i] for i in residuals)]
    return _call(b, f, conv, func, args, dtype, k)
