"""Depthwise conv2d (one filter per channel, MobileNet's 3x3) for x86 SIMD: int16 pair dot products along
channels (AVX-512 VNNI `vpdpwssd`, AVX2 `vpmaddwd`), with the requantize fused in as for the dense convs
(`x86_conv`).

Exact form: acc[n, y, x, c] = sum_{r, s} (x - zp)[n, y*sh + r*dh, x*sw + s*dw, c] * w[c, r, s] + bias[c], with
(x - zp) zero-padded inside the kernel; |x - zp| <= 510 and |w| <= 127, so kh*kw taps of 510 * 127 stay far
below 2^31 for any kernel that fits `supports`. Both instructions multiply int16 pairs exactly and add them
to int32 lanes without saturation.

Pairs. The taps of one filter row are taken two at a time: columns j and j + dw of a channel are the low and
high int16 halves of one int32 ("pair" stage, formed by each parallel task for the rows it reads, as the
other kernels pad their input), and the weights (w[r, 2p], w[r, 2p + 1]) likewise (a zero partner for the last
tap of an odd kw), so one instruction does two taps of `lanes` channels: a 3x3 filter is 6 instructions per
output vector instead of 9 widening multiplies and 9 adds. With stride sw and 2 dw a multiple of sw (stride
2, dilation 1) the taps read only every sw-th pair column, and only those are formed.

Layout: x [n, H, W, C_pad] uint8/int8 (channels padded to the lane count, in Relax), weight int16
[kh, kw, C_pad / lanes, lanes] (parameter-only: packed once at upload; paired inside the kernel, a few hundred
values), output [n, OH, OW, C_pad]. Each task computes a few output columns' int32 vectors in a "local" tile
(registers), then stores or requantizes them, vectorized along channels; the sets that use it give their
vector width (`depthwise_family(lanes)`): 16 int32 lanes with AVX-512, 8 with AVX2.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import numpy as np
from tvm import relax, te, tirx
from tvm.relax import op as R
from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T

from ..graph import Node, TensorInfo
from . import x86_conv, x86_requant
from .x86_conv import ConvShape, Epilogue, KernelInputs

if TYPE_CHECKING:
    from ..tvm_build import GraphBuilder

MAX_ACC = 1  # no register tile for the tuner to choose
COLUMNS = 8  # output columns per int32 tile (8 accumulators; a 3x3 filter's 6 weight pairs stay in registers)
MAX_TAPS = 49  # up to 7x7 filters: 49 * 510 * 127 + bias stays below 2^31


def supports(node: Node, input_dtype: str) -> bool:
    """A depthwise conv (groups = input channels = output channels) on 8-bit inputs with at most MAX_TAPS taps."""
    o, cin_g, kh, kw = np.shape(node.params["weight"])
    return (input_dtype in ("uint8", "int8") and cin_g == 1 and int(node.attrs["groups"]) == o > 1
            and kh * kw <= MAX_TAPS and int(np.abs(np.asarray(node.params["bias"], np.int64)).max(initial=0)) < 2**30
            and abs(int(node.attrs["input_zero_point"])) <= 255)


def _low(v: tirx.PrimExpr) -> tirx.PrimExpr:
    """The low int16 half of an int32, sign-extended."""
    return (v << tirx.const(16, "int32")) >> tirx.const(16, "int32")


def _high(v: tirx.PrimExpr) -> tirx.PrimExpr:
    return v >> tirx.const(16, "int32")


def _pair(lo: tirx.PrimExpr, hi: tirx.PrimExpr) -> tirx.PrimExpr:
    """Two int16-range int32 values as the low and high halves of one int32."""
    return (lo & tirx.const(0xFFFF, "int32")) | (hi << tirx.const(16, "int32"))


def _pair_dot(lanes: int):
    """(description, implementation) of C[i] += lo(A[i]) lo(B[i]) + hi(A[i]) hi(B[i]) over `lanes` int32 lanes,
    C in "local" scope: vpdpwssd (16 lanes) or vpmaddwd + vpaddd (8 lanes)."""

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((lanes,), "int32", offset_factor=1), B: T.Buffer((lanes,), "int32", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes], B[0:lanes])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                with T.sblock("update"):
                    vi = T.axis.remap("S", [i])
                    C[vi] = C[vi] + (((A[vi] << 16) >> 16) * ((B[vi] << 16) >> 16) + (A[vi] >> 16) * (B[vi] >> 16))

    i32, i16 = f"int32x{lanes}", f"int16x{2 * lanes}"

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((lanes,), "int32", offset_factor=1), B: T.Buffer((lanes,), "int32", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes], B[0:lanes])
            T.writes(C[0:lanes])
            a = T.reinterpret(A.vload([0], dtype=i32), dtype=i16)
            b = T.reinterpret(B.vload([0], dtype=i32), dtype=i16)
            if lanes == 16:
                C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpwssd.512"), C.vload([0], dtype=i32), a, b,
                    dtype=i32)
            else:
                C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], dtype=i32) + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a, b, dtype=i32)

    return desc, impl


def _intrinsic(lanes: int) -> str:
    """The pair-dot tensor intrinsic for `lanes` (16: AVX-512 VNNI, 8: AVX2), registered once per process."""
    name = f"dfqf_pair_dot_{lanes}x2_s16s16s32"
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, *_pair_dot(lanes))
    return name


def depthwise_nhwc(batch: tirx.Var, shape: ConvShape, epilogue: Epilogue | None = None,
                   tile: tuple[int, int] | None = None, lanes: int = 16) -> tirx.PrimFunc:
    """The scheduled kernel: x [batch, H, W, cin] (`shape.in_dtype`, unpadded spatially), zero_point int32 [1],
    w int16 [kh, kw, cin / lanes, lanes] -> int32 [batch, OH, OW, cin] (or the epilogue's requantized output).
    `tile` is accepted for the tuner's interface and ignored: the kernel has no register tile to tune."""
    (kh, kw), (sh, sw), (dh, dw) = shape.kernel, shape.stride, shape.dilation
    (h, w), (ph, pw) = shape.in_hw, shape.padding
    oh, ow = shape.output_hw
    cin, blocks, pairs = shape.cin, shape.out_blocks, (kw + 1) // 2
    x = te.placeholder((batch, h, w, cin), shape.in_dtype, name="x")
    zp = te.placeholder((1,), "int32", name="zero_point")
    wt = te.placeholder((kh, kw, blocks, lanes), "int16", name="w")

    def value(n, i, j, c):  # x - zp, 0 in the padding
        inside = tirx.all(i >= ph, i < h + ph, j >= pw, j < w + pw)
        return tirx.if_then_else(inside, x[n, i - ph, j - pw, c].astype("int32") - zp[0], tirx.const(0, "int32"))

    step = sw if (2 * dw) % sw == 0 else 1  # pair column j holds input columns j * step and j * step + dw
    width = ((ow - 1) * sw + 2 * (pairs - 1) * dw) // step + 1
    pad = te.compute((batch, h + 2 * ph, width, cin),
                     lambda n, i, j, c: _pair(value(n, i, j * step, c), value(n, i, j * step + dw, c)), name="pad")
    wpair = te.compute((kh, pairs, blocks, lanes), lambda r, p, ob, oi: _pair(
        wt[r, 2 * p, ob, oi].astype("int32"),
        tirx.if_then_else(2 * p + 1 < kw, wt[r, tirx.min(2 * p + 1, kw - 1), ob, oi].astype("int32"), 0)),
        name="wpair")
    r = te.reduce_axis((0, kh), "r")
    p = te.reduce_axis((0, pairs), "p")

    def dot(n, y, z, ob, oi):
        a = pad[n, y * sh + r * dh, (z * sw + 2 * p * dw) // step, ob * lanes + oi]
        b = wpair[r, p, ob, oi]
        return te.sum(_low(a) * _low(b) + _high(a) * _high(b), axis=[r, p])

    conv = te.compute((batch, oh, ow, blocks, lanes), dot, name="conv")
    func = x86_conv.kernel_func([x, zp, wt], conv, batch, oh, ow, lanes, epilogue, f"depthwise_nhwc_{lanes}")
    return _schedule(func, lanes, epilogue is not None, x86_requant.epilogue_intrinsic(epilogue, lanes))


def _schedule(func: tirx.PrimFunc, lanes: int, fused: bool, epilogue_intrinsic: str | None) -> tirx.PrimFunc:
    """Parallel over batch x blocks of output rows (each task forms the pair rows it reads); per channel block
    (its paired weights stay in registers), tiles of up to COLUMNS output columns accumulated in a "local"
    int32 tile over the taps, then stored or requantized (an int32 tile lets LLVM multiply by the requantizer's
    multiplier with vpmuldq; the int32-tail epilogue, `epilogue_intrinsic`, where it applies), channels
    vectorized; the weight pairs are formed once per call."""
    sch = Schedule(func)
    blk = sch.get_sblock("conv")
    n, y, z, ob, oi, r_, p_ = sch.get_loops(blk)
    oh, ow = int(sch.get(y).extent), int(sch.get(z).extent)
    zo, zi = sch.split(z, [None, max(d for d in range(1, min(ow, COLUMNS) + 1) if not ow % d)])
    yo, yi = sch.split(y, [None, max(d for d in range(1, min(oh, x86_conv.ROWS_PER_TASK) + 1) if not oh % d)])
    sch.reorder(n, yo, yi, ob, zo, r_, p_, zi, oi)
    consumer = sch.get_sblock("requantize" if fused else "store")
    sch.set_scope(blk, 0, "local")
    sch.reverse_compute_at(consumer, zo)
    *_, c_zi, c_ch = sch.get_loops(consumer)
    c_oi = sch.split(c_ch, [None, lanes])[1]
    if epilogue_intrinsic is not None:  # before the fuse, as in `x86_conv.schedule`
        sch.tensorize(c_oi, epilogue_intrinsic)
    else:
        sch.vectorize(c_oi)
    sch.unroll(c_zi)
    rows = sch.fuse(n, yo)
    sch.parallel(rows)
    pad = sch.get_sblock("pad")
    sch.compute_at(pad, rows)
    sch.vectorize(sch.split(sch.get_loops(pad)[-1], [None, lanes])[1])
    sch.vectorize(sch.get_loops(sch.get_sblock("wpair"))[-1])
    init = sch.decompose_reduction(blk, r_)
    i_zi, i_oi = sch.get_loops(init)[-2:]
    sch.vectorize(i_oi)
    sch.unroll(i_zi)
    for loop in (zi, p_, r_):
        sch.unroll(loop)
    sch.tensorize(oi, _intrinsic(lanes))
    return sch.mod["main"]


def _prepare(lanes: int, b: "GraphBuilder", node: Node, x: relax.Expr, in_info: TensorInfo | None = None
             ) -> KernelInputs | None:
    in_info = in_info or b.graph.tensors[node.inputs[0]]
    if not supports(node, in_info.dtype):
        return None
    a = node.attrs
    c, _, kh, kw = (int(d) for d in np.shape(node.params["weight"]))
    c_pad = -(-c // lanes) * lanes
    _, h, w = in_info.shape
    weight = R.astype(b.param(node, "weight"), "int16")  # [C, 1, kh, kw]
    wp = R.nn.pad(R.reshape(weight, [c, kh, kw]), [0, c_pad - c, 0, 0, 0, 0], "constant", 0.0)
    wp = b.emit(R.reshape(R.permute_dims(wp, [1, 2, 0]), [kh, kw, c_pad // lanes, lanes]))
    if c_pad != c:  # padded channels meet zero filters
        x = b.emit(R.nn.pad(x, [0, 0, 0, 0, 0, 0, 0, c_pad - c], "constant", 0.0))
    shape = ConvShape((h, w), tuple(int(p) for p in a["padding"]), c_pad, in_info.dtype, c_pad // lanes, (kh, kw),
                      tuple(a["stride"]), tuple(a["dilation"]))
    zp = relax.const(np.array([int(a["input_zero_point"])], np.int32), "int32")
    bias = b.emit(R.nn.pad(b.param(node, "bias"), [0, c_pad - c], "constant", 0.0))
    return KernelInputs(x, zp, wp, bias, c, c_pad, shape)


def depthwise_family(lanes: int) -> x86_conv.Family:
    """The depthwise kernel family with `lanes` int32 lanes per vector (16: AVX-512, 8: AVX2)."""
    return x86_conv.Family(partial(_prepare, lanes), partial(depthwise_nhwc, lanes=lanes), lanes,
                           f"depthwise{lanes}", MAX_ACC,
                           hi32_epilogue=True)
