"""int16 x int16 -> int32 conv2d for x86 with AVX2 (vpmaddwd), the fallback for CPUs without AVX-512 VNNI.

Exact form. The graph's conv is acc = sum((x - zp) * w) + bias with zero padding of (x - zp). The kernel
computes exactly that: it forms d = x - zp in int16 (|d| <= 255 for the zero points `supports` accepts)
and pads it with zeros itself (`x86_conv.padded_input`), the weights are widened to int16 once
(parameter-only work), and vpmaddwd multiplies int16 pairs and adds each pair into one int32 lane:
|d0 * w0 + d1 * w1| <= 2 * 255 * 128 < 2^31, and the int32 accumulation is exact under the bound of
`x86_conv.supports`, which applies unchanged. No vpmaddubsw: its u8 x s8 pair sums saturate int16
(2 * 255 * 127 > 2^15).

Layout. The kernel reads x as NHWC uint8 or int8 (Cin padded to a multiple of 4) and the weight as
[O/8, kh, kw, Cin/4, 2, 8, 2] int16 (O padded to a multiple of 8 with zero filters): for 4 input channels
k0..k3, half 0 holds (w[o, k0], w[o, k1]) for the 8 output lanes o and half 1 holds (w[o, k2], w[o, k3]),
the pair order vpmaddwd wants. It writes [n, OH, OW, O8] (NHWC).

Schedule. One `DOT_8X4` computes 8 output channels x 4 input channels for one output pixel: the pixel's
(d0, d1) and (d2, d3) int16 pairs are each one int32, broadcast to the 8 lanes, then two vpmaddwd with the
two weight halves and two int32 adds into the accumulator. Loops and fusion are `lower.schedules.x86_conv`'s
(shared with the VNNI set) with 8-channel blocks and at most `MAX_ACC` ymm accumulators; the fused requantize
epilogue is in int64 (AVX2 has no 64-bit vector shift by variable amounts: LLVM emulates it, exactly).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from tvm import relax, te, tirx
from tvm.relax import op as R
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from ..graph import Node, TensorInfo
from . import x86_conv, x86_requant
from .x86_conv import ConvShape, Epilogue, KernelInputs, out_hw

if TYPE_CHECKING:
    from ..tvm_build import GraphBuilder

DOT_8X4 = "dfqf_dot_8x4_s16s16s32_avx2_local"  # C in registers ("local" scope)
AVX2_FEATURES = ("avx2",)
LANES = 8  # int32 lanes of a ymm register: output channels per block
MAX_ACC = 16  # ymm accumulators per register tile: all 16 (broadcasts and weights are memory operands)


def _dot_8x4():
    """(description, implementation) of the 8 x 4 dot, with the accumulator C in "local" scope."""

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "int16", offset_factor=1),
        B: T.Buffer((2, 8, 2), "int16", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:2, 0:8, 0:2])
            T.writes(C[0:8])
            for i in T.serial(0, 8):
                for h in T.serial(0, 2):
                    for k in T.serial(0, 2):
                        with T.sblock("update"):
                            vi, vh, vk = T.axis.remap("SRR", [i, h, k])
                            C[vi] = C[vi] + T.cast(A[vh * 2 + vk], "int32") * T.cast(B[vh, vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def avx2(
        A: T.Buffer((4,), "int16", offset_factor=1),
        B: T.Buffer((2, 8, 2), "int16", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:2, 0:8, 0:2])
            T.writes(C[0:8])
            a01 = T.reinterpret(A.vload([0], "int16x2"), dtype="int32")
            a23 = T.reinterpret(A.vload([2], "int16x2"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(a01, 8), dtype="int16x16"),
                B.vload([0, 0, 0], dtype="int16x16"),
                dtype="int32x8",
            ) + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(a23, 8), dtype="int16x16"),
                B.vload([1, 0, 0], dtype="int16x16"),
                dtype="int32x8",
            )

    return desc, avx2


def register_intrinsics() -> None:
    """Register `DOT_8X4` once per process."""
    if TensorIntrin.get(DOT_8X4, allow_missing=True) is None:
        TensorIntrin.register(DOT_8X4, *_dot_8x4())


def register_tile(ow: int, out_blocks: int) -> tuple[int, int]:
    """(output columns, 8-channel blocks) of the register tile (`x86_conv.register_tile`, `MAX_ACC`)."""
    return x86_conv.register_tile(ow, out_blocks, MAX_ACC)


def conv2d_nhwc_s16(batch: tirx.Var, shape: ConvShape, epilogue: Epilogue | None = None,
                    tile: tuple[int, int] | None = None) -> tirx.PrimFunc:
    """The scheduled kernel: x [batch, H, W, cin] uint8 or int8 (`shape.in_dtype`, unpadded), zero_point int32 [1],
    w int16 [out_blocks, kh, kw, cin4 / 4, 2, 8, 2] -> int32 [batch, OH, OW, out_blocks * 8] (NHWC). The
    kernel forms d = x - zero_point in int16 and pads it with zeros itself.

    With an `epilogue`, the extra inputs and the requantized output of `x86_conv.requantize_epilogue`."""
    register_intrinsics()
    kernel, stride, dilation, out_blocks = shape.kernel, shape.stride, shape.dilation, shape.out_blocks
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    inputs, x = x86_conv.padded_int16_input(batch, shape)
    h, w = x.shape[1:3]
    oh, ow = out_hw((int(h), int(w)), kernel, stride, dilation)
    cb = int(x.shape[3]) // 4
    wt = te.placeholder((out_blocks, kh, kw, cb, 2, LANES, 2), "int16", name="w")
    r = te.reduce_axis((0, kh), "r")
    s = te.reduce_axis((0, kw), "s")
    rc = te.reduce_axis((0, cb), "rc")
    rh = te.reduce_axis((0, 2), "rh")
    rk = te.reduce_axis((0, 2), "rk")
    conv = te.compute(
        (batch, oh, ow, out_blocks, LANES),
        lambda n, y, z, ob, oi: te.sum(
            x[n, y * sh + r * dh, z * sw + s * dw, rc * 4 + rh * 2 + rk].astype("int32")
            * wt[ob, r, s, rc, rh, oi, rk].astype("int32"), axis=[r, s, rc, rh, rk]),
        name="conv")
    func = x86_conv.kernel_func([*inputs, wt], conv, batch, oh, ow, LANES, epilogue, "conv2d_nhwc_s16_avx2")
    return x86_conv.schedule(func, DOT_8X4, tile or register_tile(ow, out_blocks), LANES, epilogue is not None,
                             x86_requant.epilogue_intrinsic(epilogue, LANES))


# -- the Relax glue: graph conv2d node -> layout changes + the kernel ---------------------------------------
def _prepare(b: "GraphBuilder", node: Node, x: relax.Expr, in_info: TensorInfo | None = None) -> KernelInputs | None:
    """The kernel's inputs for conv2d `node` on x [n, H, W, Cin] (the builder's NHWC): x and its zero point;
    the packed int16 weight; the bias padded to O8 channels; the shapes. None if the kernel
    cannot run it exactly."""
    k = x86_conv.geometry(b, node, LANES, in_info)
    if k is None:
        return None
    weight = R.astype(b.param(node, "weight"), "int16")  # int4 weights: unpacked once here
    wp = R.nn.pad(weight, [0, k.o_pad - k.o, 0, k.cin4 - k.cin, 0, 0, 0, 0], "constant", 0.0)
    # [O8/8, 8 (oi), Cin4/4, 2 (half), 2 (pair), kh, kw] -> [O8/8, kh, kw, Cin4/4, half, oi, pair]
    wp = R.reshape(wp, [k.o_pad // LANES, LANES, k.cin4 // 4, 2, 2, k.kh, k.kw])
    wp = b.emit(R.permute_dims(wp, [0, 5, 6, 2, 3, 1, 4]))
    return k.kernel_inputs(b, x, int(node.attrs["input_zero_point"]), wp, b.param(node, "bias"), LANES)


FAMILY = x86_conv.Family(_prepare, conv2d_nhwc_s16, LANES, "conv2d_avx2", MAX_ACC, hi32_epilogue=True)
