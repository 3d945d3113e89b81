"""u8 x s8 -> s32 conv2d for x86 with AVX-512 VNNI (vpdpbusd), as a scheduled and tensorized TIR PrimFunc.

Exact form. The graph's conv is acc = sum((x - zp) * w) + bias with zero padding of (x - zp). With u = x as
uint8 (int8 activations: u = x + 128, zp_u = zp + 128) and the input padded with zp_u,
    acc = sum(u * w) - zp_u * sum(w) + bias,
where sum(w) runs over the whole filter of each output channel (padding positions hold zp_u, so they
cancel exactly). vpdpbusd multiplies u8 by s8 and adds groups of four products into int32 lanes without
saturation; the kernel is exact while 255 * max|w| * Cin * kh * kw < 2^31 (checked by `supports`).

Layout. The kernel reads the padded input as NHWC uint8 with Cin padded to a multiple of 4 (the builder
keeps activations NHWC, so this is a pad, no transpose) and the weight as [O/16, kh, kw, Cin/4, 16, 4]
int8 (O padded to a multiple of 16 with zero filters); it writes [n, OH, OW, O16] (NHWC). The Relax glue
around it (padding, weight packing, the zp_u * sum(w) correction folded into the bias) is plain Relax;
the parameter-only part of it moves to main_transform_params.

Fusion. A conv whose only consumer is a requantize (`lower.tvm_build` finds the pairs) is emitted with
`emit_conv2d_requantize`: the requantize, residual terms included, is the kernel's epilogue (`Epilogue`),
applied to each register tile while it is still in registers, so one kernel per conv writes the 8-bit
activation and the int32 accumulator never reaches memory. The epilogue keeps the requantize's int64
arithmetic (acc * M0 can reach 2^62), vectorized with vpmullq/vpsravq.

Schedule. One vpdpbusd computes 16 output channels x 4 input channels for one output pixel (the
`DOT_16X4` intrinsic below, registered with the <64 x i8> operand types LLVM 22 requires; the wheel's
`dot_16x4_vnni` still passes <16 x i32> and fails LLVM verification). Loops: batch x output row
(parallel), output column tiles, then the reduction (kh, kw, Cin/4), then the `register_tile` of columns x
16-channel blocks (unrolled; at most `MAX_ACC` zmm accumulators, held in a "local" buffer that LLVM keeps
in registers), then the tensorized 16 x 4; after the reduction, the tile's store or epilogue.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax import op as R
from tvm.script import tirx as T
from tvm.s_tir import Schedule, TensorIntrin

from ..graph import Node

if TYPE_CHECKING:
    from ..tvm_build import GraphBuilder

DOT_16X4 = "dfqf_dot_16x4_u8s8s32_vnni_local"  # C in registers ("local" scope)
VNNI_FEATURES = ("avx512vnni",)
MAX_ACC = 16  # zmm accumulators per register tile (of 32 registers: the rest hold weights and broadcasts)
MAX_EXACT = 2**31 - 1
OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps leaves the scheduled kernel alone


def _dot_16x4(scope: str):
    """(description, implementation) of the 16 x 4 dot with the accumulator C in memory scope `scope`.
    The schedule accumulates in "local" (registers); tensorize matches buffer scopes, hence one pair per scope."""

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope=scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def vnni(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope=scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64"),
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16",
            )

    return desc, vnni


def register_intrinsics() -> None:
    """Register `DOT_16X4` once per process."""
    if TensorIntrin.get(DOT_16X4, allow_missing=True) is None:
        TensorIntrin.register(DOT_16X4, *_dot_16x4("local"))


def _out_hw(in_hw, kernel, stride, dilation) -> tuple[int, int]:
    return tuple((i - (k - 1) * d - 1) // s + 1 for i, k, s, d in zip(in_hw, kernel, stride, dilation))


@dataclass(frozen=True)
class Epilogue:
    """A requantize applied to the conv accumulator inside the kernel (see `conv2d_nhwc_u8s8`).

    acc_zero_point: the requantize's zero point for the conv term; residual_zero_points: one per residual
    input (uint8/int8 [batch, OH, OW, out_blocks * 16]); the rest are the requantize's attributes."""

    acc_zero_point: int
    residual_zero_points: tuple[int, ...]
    output_zero_point: int
    qmin: int
    qmax: int
    dtype: str
    residual_dtypes: tuple[str, ...]


def register_tile(ow: int, out_blocks: int) -> tuple[int, int]:
    """(output columns, 16-channel blocks) of the register tile: as many accumulators as fit `MAX_ACC`,
    the columns dividing OW and the blocks dividing out_blocks (no remainder tiles)."""
    best = (1, 1)
    for obt in range(1, out_blocks + 1):
        for zt in range(1, ow + 1):
            if out_blocks % obt or ow % zt or zt * obt > MAX_ACC:
                continue
            if (zt * obt, obt) > (best[0] * best[1], best[1]):
                best = (zt, obt)
    return best


def conv2d_nhwc_u8s8(batch: tirx.Var, in_hw: tuple[int, int], cin: int, out_blocks: int, kernel: tuple[int, int],
                     stride: tuple[int, int], dilation: tuple[int, int], epilogue: Epilogue | None = None,
                     tile: tuple[int, int] | None = None) -> tirx.PrimFunc:
    """The scheduled kernel: x uint8 [batch, H, W, cin] (already padded; cin % 4 == 0),
    w int8 [out_blocks, kh, kw, cin / 4, 16, 4] -> int32 [batch, OH, OW, out_blocks * 16] (NHWC).

    With an `epilogue`, the extra inputs are bias int32 [C], multiplier int64 [1 + R, C] (the conv term's
    row first), offset int64 [C] (the requantize's offset plus its rounding 2^(shift - 1)), shift int64 [C]
    and the R residuals (C = out_blocks * 16), and the output is the requantized tensor, computed on each
    register tile right after its reduction: the int32 accumulators never reach memory and each conv is
    one kernel. The arithmetic is the requantize's own int64 form (`lower.tvm_build._requantize`); summing
    the offset and rounding first changes nothing, int64 addition being associative (even modulo 2^64).
    """
    register_intrinsics()
    (h, w), (kh, kw), (sh, sw), (dh, dw) = in_hw, kernel, stride, dilation
    oh, ow = _out_hw(in_hw, kernel, stride, dilation)
    cb = cin // 4
    x = te.placeholder((batch, h, w, cin), "uint8", name="x")
    wt = te.placeholder((out_blocks, kh, kw, cb, 16, 4), "int8", name="w")
    r = te.reduce_axis((0, kh), "r")
    s = te.reduce_axis((0, kw), "s")
    rc = te.reduce_axis((0, cb), "rc")
    ri = te.reduce_axis((0, 4), "ri")
    conv = te.compute(
        (batch, oh, ow, out_blocks, 16),
        lambda n, y, z, ob, oi: te.sum(
            x[n, y * sh + r * dh, z * sw + s * dw, rc * 4 + ri].astype("int32")
            * wt[ob, r, s, rc, oi, ri].astype("int32"), axis=[r, s, rc, ri]),
        name="conv")
    args = [x, wt]
    c = out_blocks * 16
    if epilogue is None:
        out = te.compute((batch, oh, ow, c), lambda n, y, z, ch: conv[n, y, z, ch // 16, ch % 16], name="store")
    else:
        e = epilogue
        bias = te.placeholder((c,), "int32", name="bias")
        mult = te.placeholder((1 + len(e.residual_zero_points), c), "int64", name="multiplier")
        offset = te.placeholder((c,), "int64", name="offset")
        shift = te.placeholder((c,), "int64", name="shift")
        res = [te.placeholder((batch, oh, ow, c), dt, name=f"residual{i}") for i, dt in enumerate(e.residual_dtypes)]
        args += [bias, mult, offset, shift, *res]

        def requantize(n, y, z, ch):
            t = (conv[n, y, z, ch // 16, ch % 16] + bias[ch]).astype("int64") - tirx.const(e.acc_zero_point, "int64")
            total = t * mult[0, ch]
            for i, (rt, zp) in enumerate(zip(res, e.residual_zero_points)):
                total = total + (rt[n, y, z, ch].astype("int64") - tirx.const(zp, "int64")) * mult[1 + i, ch]
            q = ((total + offset[ch]) >> shift[ch]) + tirx.const(e.output_zero_point, "int64")
            return tirx.max(tirx.min(q, tirx.const(e.qmax, "int64")), tirx.const(e.qmin, "int64")).astype(e.dtype)

        out = te.compute((batch, oh, ow, c), requantize, name="requantize")
    func = te.create_prim_func([*args, out]).with_attr("global_symbol", "conv2d_nhwc_u8s8")
    sch = Schedule(func)
    blk = sch.get_sblock("conv")
    n, y, z, ob, oi, r_, s_, rc_, ri_ = sch.get_loops(blk)
    zt, obt = tile or register_tile(ow, out_blocks)
    zo, zi = sch.split(z, [None, zt])
    obo, obi = sch.split(ob, [None, obt])
    sch.reorder(n, y, zo, obo, r_, s_, rc_, zi, obi, oi, ri_)
    outer = sch.fuse(n, y)
    sch.parallel(outer)
    # Accumulate the register tile in a "local" buffer consumed once per tile (by the write-back or the
    # epilogue): with every index constant after unrolling, LLVM keeps it in zmm registers instead of
    # loading and storing the output at every reduction step.
    consumer = sch.get_sblock("store" if epilogue is None else "requantize")
    sch.set_scope(blk, 0, "local")
    sch.reverse_compute_at(consumer, obo)
    *_, c_zi, c_ch = sch.get_loops(consumer)
    c_obi, c_oi = sch.split(c_ch, [None, 16])
    init = sch.decompose_reduction(blk, r_)
    for b_zi, b_obi, b_oi in (sch.get_loops(init)[-3:], (c_zi, c_obi, c_oi)):
        sch.vectorize(b_oi)
        sch.unroll(b_obi)
        sch.unroll(b_zi)
    sch.unroll(zi)
    sch.unroll(obi)
    sch.tensorize(oi, DOT_16X4)
    return sch.mod["main"]


# -- the Relax glue: graph conv2d node -> layout changes + the kernel + bias correction -------------------
def supports(node: Node, input_dtype: str) -> bool:
    """Whether `node` (a conv2d) runs on the kernel exactly: 8-bit input storage with its zero point
    representable as uint8 after the +128 shift, one group, and no int32 overflow anywhere in
    sum(u * w) - zp_u * sum(w) + bias."""
    a = node.attrs
    if input_dtype not in ("uint8", "int8") or int(a["groups"]) != 1:
        return False
    zp_u = int(a["input_zero_point"]) + (128 if input_dtype == "int8" else 0)
    o, cin, kh, kw = np.shape(node.params["weight"])
    w_max = 2 ** (int(a["weight_bits"]) - 1)
    bias_max = int(np.abs(np.asarray(node.params["bias"], np.int64)).max(initial=0))
    return 0 <= zp_u <= 255 and 2 * 255 * w_max * cin * kh * kw + bias_max <= MAX_EXACT


def _prepare(b: "GraphBuilder", node: Node, x: relax.Expr) -> dict | None:
    """The kernel's inputs for conv2d `node` on x [n, H, W, Cin] (the builder's NHWC): the padded uint8
    input, the packed weight, bias - zp_u * sum(w) padded to O16 channels, and the shapes; None if the
    kernel cannot run it exactly."""
    in_info = b.graph.tensors[node.inputs[0]]
    if not supports(node, in_info.dtype):
        return None
    a = node.attrs
    o, cin, kh, kw = (int(d) for d in np.shape(node.params["weight"]))
    (ph, pw), stride, dilation = a["padding"], tuple(a["stride"]), tuple(a["dilation"])
    _, h, w = in_info.shape
    cin4, o16 = -(-cin // 4) * 4, -(-o // 16) * 16
    zp_u = int(a["input_zero_point"]) + (128 if in_info.dtype == "int8" else 0)

    if in_info.dtype == "int8":  # u = x + 128 as uint8 (the bit pattern with its sign bit flipped)
        x = R.astype(R.add(R.astype(x, "int16"), relax.const(np.int16(128), "int16")), "uint8")
    u = b.emit(R.nn.pad(x, [0, 0, ph, ph, pw, pw, 0, cin4 - cin], "constant", float(zp_u)))

    weight = b.emit(b.param(node, "weight"))  # [O, Cin, kh, kw] int8 (int4 weights: unpacked once here)
    wp = R.nn.pad(weight, [0, o16 - o, 0, cin4 - cin, 0, 0, 0, 0], "constant", 0.0)
    wp = b.emit(R.permute_dims(R.reshape(wp, [o16 // 16, 16, cin4 // 4, 4, kh, kw]), [0, 4, 5, 2, 1, 3]))
    # bias - zp_u * sum(w): in int32 without overflow (`supports`)
    wsum = R.sum(R.astype(weight, "int32"), axis=[1, 2, 3])
    bias = R.subtract(b.param(node, "bias"), R.multiply(wsum, relax.const(np.int32(zp_u), "int32")))
    padded = (h + 2 * ph, w + 2 * pw)
    return dict(u=u, wp=wp, bias=b.emit(R.nn.pad(bias, [0, o16 - o], "constant", 0.0)), o=o, o16=o16,
                args=(b.batch, padded, cin4, o16 // 16, (kh, kw), stride, dilation),
                out_hw=_out_hw(padded, (kh, kw), stride, dilation))


def _call(b: "GraphBuilder", node: Node, func: tirx.PrimFunc, args: list, dtype: str, k: dict) -> relax.Expr:
    """Call the kernel; [n, OH, OW, O16] -> [n, OH, OW, O] (dropping padded channels)."""
    gv = b.bb.add_func(func.with_attrs({"op_pattern": OPAQUE, "tirx.is_scheduled": True}), f"{node.name}_conv2d_vnni")
    (oh, ow), o, o16 = k["out_hw"], k["o"], k["o16"]
    out = b.emit(relax.call_tir(gv, args, relax.TensorType([b.batch, oh, ow, o16], dtype)))
    return R.strided_slice(out, [3], [0], [o]) if o16 != o else out


def emit_conv2d(b: "GraphBuilder", node: Node, x: relax.Expr) -> relax.Expr | None:
    """acc [n, OH, OW, O] int32 of conv2d `node` on x [n, H, W, Cin] (the builder's NHWC), or None if the
    kernel cannot run it."""
    k = _prepare(b, node, x)
    if k is None:
        return None
    acc = _call(b, node, conv2d_nhwc_u8s8(*k["args"]), [k["u"], k["wp"]], "int32", k)
    return R.add(acc, b.per_channel(R.strided_slice(k["bias"], [0], [0], [k["o"]]), 4))


def emit_conv2d_requantize(b: "GraphBuilder", conv: Node, rq: Node, x: relax.Expr,
                           terms: list[relax.Expr | None]) -> relax.Expr | None:
    """requantize `rq` of conv2d `conv` (its term terms.index(None)) and residual `terms`, as one kernel
    (`Epilogue`); [n, OH, OW, O] in rq's storage dtype, or None when the kernel cannot run it (the builder
    then emits the two ops separately)."""
    g = b.graph
    o = int(np.shape(conv.params["weight"])[0])
    j = terms.index(None)
    residuals = [i for i in range(len(terms)) if i != j]
    if residuals and o % 16:  # residuals are read at the padded channel index
        return None
    if any(tuple(g.tensors[rq.inputs[i]].shape) != tuple(g.tensors[conv.name].shape) for i in residuals):
        return None  # broadcasting terms: the plain requantize handles them
    channels = int(np.shape(rq.params["shift"])[0])
    if channels not in (1, o):
        return None
    k = _prepare(b, conv, x)
    if k is None:
        return None
    o16 = k["o16"]

    def per_out_channel(v: relax.Expr, rows: int | None = None) -> relax.Expr:
        """[C] or [rows, C] int64 with C = 1 or O -> [O16] / [rows, O16] (padded channels: 0)."""
        shape = [o] if rows is None else [rows, o]
        v = R.broadcast_to(v, shape) if channels == 1 else v
        return R.nn.pad(v, [0, 0] * (len(shape) - 1) + [0, o16 - o], "constant", 0.0)

    a = rq.attrs
    zps = [int(zp) for zp in a["input_zero_points"]]
    mult = per_out_channel(R.take(b.param(rq, "multiplier"), relax.const(np.array([j, *residuals], np.int64), "int64"),
                                  axis=0, mode="clip"), len(terms))
    shift = b.emit(per_out_channel(b.param(rq, "shift")))
    one, zero = relax.const(np.int64(1), "int64"), relax.const(np.int64(0), "int64")
    rounding = R.where(R.greater(shift, zero), R.left_shift(one, R.maximum(R.subtract(shift, one), zero)), zero)
    offset = R.add(per_out_channel(b.param(rq, "offset")), rounding)
    dtype = g.tensors[rq.name].dtype
    epilogue = Epilogue(zps[j], tuple(zps[i] for i in residuals), int(a["output_zero_point"]), int(a["qmin"]),
                        int(a["qmax"]), dtype, tuple(g.tensors[rq.inputs[i]].dtype for i in residuals))
    func = conv2d_nhwc_u8s8(*k["args"], epilogue=epilogue)
    args = [k["u"], k["wp"], k["bias"], b.emit(mult), b.emit(offset), shift, *(terms[i] for i in residuals)]
    return _call(b, conv, func, args, dtype, k)
