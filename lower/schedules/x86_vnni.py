"""u8 x s8 -> s32 conv2d for x86 with AVX-512 VNNI (vpdpbusd), as a scheduled and tensorized TIR PrimFunc.

Exact form. The graph's conv is acc = sum((x - zp) * w) + bias with zero padding of (x - zp). With u = x as
uint8 (int8 activations: u = x + 128, zp_u = zp + 128) and the input padded with zp_u,
    acc = sum(u * w) - zp_u * sum(w) + bias,
where sum(w) runs over the whole filter of each output channel (padding positions hold zp_u, so they
cancel exactly). vpdpbusd multiplies u8 by s8 and adds groups of four products into int32 lanes without
saturation; the kernel is exact while 255 * max|w| * Cin * kh * kw < 2^31 (checked by `supports`).

Layout. The kernel reads the unpadded activation as NHWC uint8 or int8 (Cin padded to a multiple of 4, in
Relax, only where Cin % 4 != 0: the first conv) and forms u, padded with zp_u, row block by row block inside
itself (`x86_conv.padded_input`); the weight is [O/16, kh, kw, Cin/4, 16, 4] int8 (O padded to a multiple
of 16 with zero filters); it writes [n, OH, OW, O16] (NHWC). The Relax glue around it (weight packing, the
zp_u * sum(w) correction folded into the bias) is parameter-only and moves to main_transform_params.

Schedule and fusion: `lower.schedules.x86_conv` (shared with the AVX2 set), with 16-channel blocks. One
vpdpbusd computes 16 output channels x 4 input channels for one output pixel (the `DOT_16X4` intrinsic
below, registered with the <64 x i8> operand types LLVM 22 requires; the wheel's `dot_16x4_vnni` still
passes <16 x i32> and fails LLVM verification). A conv whose only consumer is a requantize is one kernel
with the requantize, residual terms included, as its epilogue (`x86_conv.Epilogue`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tvm import relax, te, tirx
from tvm.relax import op as R
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from ..graph import Node, TensorInfo
from . import x86_conv, x86_requant
from .x86_conv import ConvShape, Epilogue, KernelInputs, out_hw, supports  # noqa: F401 (supports: this set's API)

if TYPE_CHECKING:
    from ..tvm_build import GraphBuilder

DOT_16X4 = "dfqf_dot_16x4_u8s8s32_vnni_local"  # C in registers ("local" scope)
VNNI_FEATURES = ("avx512vnni",)
LANES = 16  # int32 lanes of a zmm register: output channels per block
MAX_ACC = 16  # zmm accumulators per register tile (of 32 registers: the rest hold weights and broadcasts)


def _dot_16x4():
    """(description, implementation) of the 16 x 4 dot, with the accumulator C in "local" scope (registers:
    the schedule accumulates there, and tensorize matches buffer scopes)."""

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
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
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
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
        TensorIntrin.register(DOT_16X4, *_dot_16x4())


def register_tile(ow: int, out_blocks: int) -> tuple[int, int]:
    """(output columns, 16-channel blocks) of the register tile (`x86_conv.register_tile`, `MAX_ACC`)."""
    return x86_conv.register_tile(ow, out_blocks, MAX_ACC)


def conv2d_nhwc_u8s8(batch: tirx.Var, shape: ConvShape, epilogue: Epilogue | None = None,
                     tile: tuple[int, int] | None = None) -> tirx.PrimFunc:
    """The scheduled kernel: x [batch, H, W, cin] uint8 or int8 (`shape.in_dtype`, unpadded), zero_point int32 [1]
    (zp_u: the input zero point, + 128 for int8 inputs), w int8 [out_blocks, kh, kw, cin4 / 4, 16, 4] ->
    int32 [batch, OH, OW, out_blocks * 16] (NHWC); with an `epilogue`, the extra inputs and the requantized
    output of `x86_conv.requantize_epilogue`. The kernel pads u (x + 128 for int8) with zp_u itself."""
    register_intrinsics()
    kernel, stride, dilation, out_blocks = shape.kernel, shape.stride, shape.dilation, shape.out_blocks
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    to_u8 = None if shape.in_dtype == "uint8" else (  # the bit pattern with its sign bit flipped
        lambda v, zp: (v.astype("int16") + tirx.const(128, "int16")).astype("uint8"))
    inputs, x = x86_conv.padded_input(batch, shape.in_hw, shape.padding, shape.cin, shape.in_dtype, "uint8", to_u8,
                                      lambda zp: zp.astype("uint8"))
    h, w = x.shape[1:3]
    oh, ow = out_hw((int(h), int(w)), kernel, stride, dilation)
    cb = int(x.shape[3]) // 4
    wt = te.placeholder((out_blocks, kh, kw, cb, LANES, 4), "int8", name="w")
    r = te.reduce_axis((0, kh), "r")
    s = te.reduce_axis((0, kw), "s")
    rc = te.reduce_axis((0, cb), "rc")
    ri = te.reduce_axis((0, 4), "ri")
    conv = te.compute(
        (batch, oh, ow, out_blocks, LANES),
        lambda n, y, z, ob, oi: te.sum(
            x[n, y * sh + r * dh, z * sw + s * dw, rc * 4 + ri].astype("int32")
            * wt[ob, r, s, rc, oi, ri].astype("int32"), axis=[r, s, rc, ri]),
        name="conv")
    func = x86_conv.kernel_func([*inputs, wt], conv, batch, oh, ow, LANES, epilogue, "conv2d_nhwc_u8s8")
    return x86_conv.schedule(func, DOT_16X4, tile or register_tile(ow, out_blocks), LANES, epilogue is not None,
                             x86_requant.epilogue_intrinsic(epilogue, LANES))


# -- the Relax glue: graph conv2d node -> layout changes + the kernel + bias correction -------------------
def _prepare(b: "GraphBuilder", node: Node, x: relax.Expr, in_info: TensorInfo | None = None) -> KernelInputs | None:
    """The kernel's inputs for conv2d `node` on x [n, H, W, Cin] (the builder's NHWC): x and zp_u, the packed
    weight, bias - zp_u * sum(w) padded to O16 channels, and the shapes; None if the
    kernel cannot run it exactly."""
    k = x86_conv.geometry(b, node, LANES, in_info)
    if k is None:
        return None
    zp_u = int(node.attrs["input_zero_point"]) + (128 if k.in_dtype == "int8" else 0)

    weight = b.emit(b.param(node, "weight"))  # [O, Cin, kh, kw] int8 (int4 weights: unpacked once here)
    wp = R.nn.pad(weight, [0, k.o_pad - k.o, 0, k.cin4 - k.cin, 0, 0, 0, 0], "constant", 0.0)
    wp = R.reshape(wp, [k.o_pad // LANES, LANES, k.cin4 // 4, 4, k.kh, k.kw])
    wp = b.emit(R.permute_dims(wp, [0, 4, 5, 2, 1, 3]))
    # bias - zp_u * sum(w): in int32 without overflow (`supports`)
    wsum = R.sum(R.astype(weight, "int32"), axis=[1, 2, 3])
    bias = R.subtract(b.param(node, "bias"), R.multiply(wsum, relax.const(np.int32(zp_u), "int32")))
    return k.kernel_inputs(b, x, zp_u, wp, bias, LANES)


FAMILY = x86_conv.Family(_prepare, conv2d_nhwc_u8s8, LANES, "conv2d_vnni", MAX_ACC, hi32_epilogue=True)
