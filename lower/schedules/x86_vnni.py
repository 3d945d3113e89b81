"""u8 x s8 -> s32 conv2d for x86 with AVX-512 VNNI (vpdpbusd), as a scheduled and tensorized TIR PrimFunc.

Exact form. The graph's conv is acc = sum((x - zp) * w) + bias with zero padding of (x - zp). With u = x as
uint8 (int8 activations: u = x + 128, zp_u = zp + 128) and the input padded with zp_u,
    acc = sum(u * w) - zp_u * sum(w) + bias,
where sum(w) runs over the whole filter of each output channel (padding positions hold zp_u, so they
cancel exactly). vpdpbusd multiplies u8 by s8 and adds groups of four products into int32 lanes without
saturation; the kernel is exact while 255 * max|w| * Cin * kh * kw < 2^31 (checked by `supports`).

Layout. The kernel reads the padded input as NHWC uint8 with Cin padded to a multiple of 4 and the weight
as [O/16, kh, kw, Cin/4, 16, 4] int8 (O padded to a multiple of 16 with zero filters); it writes
[n, OH, OW, O/16, 16] int32 (= NHWC). The Relax glue around it (layout changes, padding, weight packing,
the zp_u * sum(w) correction folded into the bias) is plain Relax and fuses with its neighbours.

Schedule. One vpdpbusd computes 16 output channels x 4 input channels for one output pixel (the
`DOT_16X4` intrinsic below, registered with the <64 x i8> operand types LLVM 22 requires; the wheel's
`dot_16x4_vnni` still passes <16 x i32> and fails LLVM verification). Loops: batch x output row
(parallel), output column tiles, then the reduction (kh, kw, Cin/4), then a register tile of
`COL_TILE` columns x up to `OC_TILE` channel blocks (unrolled; 16 zmm accumulators at most), then the
tensorized 16 x 4.
"""
from __future__ import annotations

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

DOT_16X4 = "dfqf_dot_16x4_u8s8s32_vnni"
VNNI_FEATURES = ("avx512vnni",)
COL_TILE = 8  # output columns per register tile
OC_TILE = 2  # 16-channel blocks per register tile
MAX_EXACT = 2**31 - 1
OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps leaves the scheduled kernel alone


@T.prim_func(s_tir=True)
def _dot_16x4_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
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
def _dot_16x4_vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
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


def register_intrinsics() -> None:
    """Register `DOT_16X4` once per process."""
    if TensorIntrin.get(DOT_16X4, allow_missing=True) is None:
        TensorIntrin.register(DOT_16X4, _dot_16x4_desc, _dot_16x4_vnni)


def _out_hw(in_hw, kernel, stride, dilation) -> tuple[int, int]:
    return tuple((i - (k - 1) * d - 1) // s + 1 for i, k, s, d in zip(in_hw, kernel, stride, dilation))


def conv2d_nhwc_u8s8(batch: tirx.Var, in_hw: tuple[int, int], cin: int, out_blocks: int, kernel: tuple[int, int],
                     stride: tuple[int, int], dilation: tuple[int, int]) -> tirx.PrimFunc:
    """The scheduled kernel: x uint8 [batch, H, W, cin] (already padded; cin % 4 == 0),
    w int8 [out_blocks, kh, kw, cin / 4, 16, 4] -> int32 [batch, OH, OW, out_blocks, 16]."""
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
    out = te.compute(
        (batch, oh, ow, out_blocks, 16),
        lambda n, y, z, ob, oi: te.sum(
            x[n, y * sh + r * dh, z * sw + s * dw, rc * 4 + ri].astype("int32")
            * wt[ob, r, s, rc, oi, ri].astype("int32"), axis=[r, s, rc, ri]),
        name="conv")
    func = te.create_prim_func([x, wt, out]).with_attr("global_symbol", "conv2d_nhwc_u8s8")
    sch = Schedule(func)
    blk = sch.get_sblock("conv")
    n, y, z, ob, oi, r_, s_, rc_, ri_ = sch.get_loops(blk)
    zt = next(t for t in (COL_TILE, 7, 6, 5, 4, 3, 2, 1) if ow % t == 0)
    obt = next(t for t in (OC_TILE, 1) if out_blocks % t == 0)
    zo, zi = sch.split(z, [None, zt])
    obo, obi = sch.split(ob, [None, obt])
    sch.reorder(n, y, zo, obo, r_, s_, rc_, zi, obi, oi, ri_)
    outer = sch.fuse(n, y)
    sch.parallel(outer)
    init = sch.decompose_reduction(blk, r_)
    sch.vectorize(sch.get_loops(init)[-1])
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


def emit_conv2d(b: "GraphBuilder", node: Node, x: relax.Expr) -> relax.Expr | None:
    """acc [n, O, OH, OW] int32 of conv2d `node` on x [n, Cin, H, W], or None if the kernel cannot run it."""
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
    u = R.nn.pad(R.permute_dims(x, [0, 2, 3, 1]), [0, 0, ph, ph, pw, pw, 0, cin4 - cin], "constant", float(zp_u))
    u = b.emit(u)

    weight = b.emit(b.param(node, "weight"))  # [O, Cin, kh, kw] int8 (int4 weights: unpacked once here)
    wp = R.nn.pad(weight, [0, o16 - o, 0, cin4 - cin, 0, 0, 0, 0], "constant", 0.0)
    wp = R.permute_dims(R.reshape(wp, [o16 // 16, 16, cin4 // 4, 4, kh, kw]), [0, 4, 5, 2, 1, 3])
    wp = b.emit(wp)

    func = conv2d_nhwc_u8s8(b.batch, (h + 2 * ph, w + 2 * pw), cin4, o16 // 16, (kh, kw), stride, dilation)
    oh, ow = _out_hw((h + 2 * ph, w + 2 * pw), (kh, kw), stride, dilation)
    gv = b.bb.add_func(func.with_attrs({"op_pattern": OPAQUE, "tirx.is_scheduled": True}), f"{node.name}_conv2d_vnni")
    acc = b.emit(relax.call_tir(gv, [u, wp], relax.TensorType([b.batch, oh, ow, o16 // 16, 16], "int32")))
    acc = R.reshape(acc, [b.batch, oh, ow, o16])
    if o16 != o:
        acc = R.strided_slice(acc, [3], [0], [o])
    # bias - zp_u * sum(w): in int32 without overflow (`supports`)
    wsum = R.sum(R.astype(weight, "int32"), axis=[1, 2, 3])
    bias = R.subtract(b.param(node, "bias"), R.multiply(wsum, relax.const(np.int32(zp_u), "int32")))
    return R.add(R.permute_dims(acc, [0, 3, 1, 2]), b.per_channel(bias, 4))
