"""Depthwise conv2d (one filter per channel, MobileNet's 3x3) for x86 SIMD: int32 vector multiply-adds along
channels, with the requantize fused in as for the dense convs (`x86_conv`).

Exact form: acc[n, y, x, c] = sum_{r, s} (x - zp)[n, y*sh + r*dh, x*sw + s*dw, c] * w[c, r, s] + bias[c], with
(x - zp) formed in int16 and zero-padded inside the kernel (`x86_conv.padded_input`) and the products summed
in int32; |x - zp| <= 510 and |w| <= 127, so kh*kw taps of 510 * 127 stay far below 2^31 for any kernel that
fits `supports`.

Layout: x [n, H, W, C_pad] uint8/int8 (channels padded to the lane count, in Relax), weight int16
[kh, kw, C_pad / lanes, lanes] (parameter-only: packed once at upload), output [n, OH, OW, C_pad]. There is no
channel reduction to tensorize: each output vector of `lanes` channels is the kh * kw products written out as
one expression into an int32 tile of a few columns, then stored or requantized, vectorized along channels; the sets
that use it give their vector width (`depthwise_family(lanes)`): 16 int32 lanes with AVX-512, 8 with AVX2.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import numpy as np
from tvm import relax, te, tirx
from tvm.relax import op as R
from tvm.s_tir import Schedule

from ..graph import Node, TensorInfo
from . import x86_conv
from .x86_conv import ConvShape, Epilogue, KernelInputs, out_hw

if TYPE_CHECKING:
    from ..tvm_build import GraphBuilder

MAX_ACC = 1  # no register tile for the tuner to choose
COLUMNS = 4  # output columns per int32 tile
MAX_TAPS = 49  # up to 7x7 filters: 49 * 510 * 127 + bias stays below 2^31


def supports(node: Node, input_dtype: str) -> bool:
    """A depthwise conv (groups = input channels = output channels) on 8-bit inputs with at most MAX_TAPS taps."""
    o, cin_g, kh, kw = np.shape(node.params["weight"])
    return (input_dtype in ("uint8", "int8") and cin_g == 1 and int(node.attrs["groups"]) == o > 1
            and kh * kw <= MAX_TAPS and int(np.abs(np.asarray(node.params["bias"], np.int64)).max(initial=0)) < 2**30
            and abs(int(node.attrs["input_zero_point"])) <= 255)


def depthwise_nhwc(batch: tirx.Var, shape: ConvShape, epilogue: Epilogue | None = None,
                   tile: tuple[int, int] | None = None, lanes: int = 16) -> tirx.PrimFunc:
    """The scheduled kernel: x [batch, H, W, cin] (`shape.in_dtype`, unpadded spatially), zero_point int32 [1],
    w int16 [kh, kw, cin / lanes, lanes] -> int32 [batch, OH, OW, cin] (or the epilogue's requantized output).
    `tile` is accepted for the tuner's interface and ignored: the kernel has no register tile."""
    kernel, stride, dilation = shape.kernel, shape.stride, shape.dilation
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    inputs, x = x86_conv.padded_int16_input(batch, shape)
    h, w = x.shape[1:3]
    oh, ow = out_hw((int(h), int(w)), kernel, stride, dilation)
    blocks = shape.out_blocks
    wt = te.placeholder((kh, kw, blocks, lanes), "int16", name="w")

    def taps(n, y, z, ob, oi):  # the kh * kw products as one expression: no reduction loop to schedule around
        terms = [x[n, y * sh + r * dh, z * sw + s * dw, ob * lanes + oi].astype("int32")
                 * wt[r, s, ob, oi].astype("int32") for r in range(kh) for s in range(kw)]
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total

    conv = te.compute((batch, oh, ow, blocks, lanes), taps, name="conv")
    func = x86_conv.kernel_func([*inputs, wt], conv, batch, oh, ow, lanes, epilogue, f"depthwise_nhwc_{lanes}")
    return _schedule(func, lanes, epilogue is not None)


def _schedule(func: tirx.PrimFunc, lanes: int, fused: bool) -> tirx.PrimFunc:
    """Parallel over batch x blocks of output rows (each task forms the padded rows it reads); per channel
    block, a few output columns' taps summed in an int32 "local" tile, then stored or requantized (an int32
    tile lets LLVM multiply by the requantizer's multiplier with vpmuldq: 2x faster than the inlined form,
    which it widened to vpmullq); channels vectorized."""
    sch = Schedule(func)
    conv = sch.get_sblock("conv")
    out = sch.get_sblock("requantize" if fused else "store")
    n, y, z, ch = sch.get_loops(out)
    oh, ow = int(sch.get(y).extent), int(sch.get(z).extent)
    yo, yi = sch.split(y, [None, max(d for d in range(1, min(oh, x86_conv.ROWS_PER_TASK) + 1) if not oh % d)])
    cho, chi = sch.split(ch, [None, lanes])
    zo, zi = sch.split(z, [None, max(d for d in range(1, min(ow, COLUMNS) + 1) if not ow % d)])
    sch.reorder(n, yo, yi, cho, zo, zi, chi)  # channel block outside the columns: its weights stay in registers
    rows = sch.fuse(n, yo)
    sch.parallel(rows)
    sch.set_scope(conv, 0, "local")
    sch.compute_at(conv, zo)
    *_, c_zi, c_ob, c_oi = sch.get_loops(conv)
    sch.vectorize(c_oi)
    sch.unroll(c_ob)
    sch.unroll(c_zi)
    sch.vectorize(chi)
    sch.unroll(zi)
    if any(sch.get(b).name_hint == "pad" for b in sch.get_child_blocks(sch.get_sblock("root"))):
        pad = sch.get_sblock("pad")
        sch.compute_at(pad, rows)
        # int16 channels in vectors of `lanes`: a vector as long as the channel count (e.g. 144) is split by
        # LLVM into element inserts and extracts
        sch.vectorize(sch.split(sch.get_loops(pad)[-1], [None, lanes])[1])
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
                           f"depthwise{lanes}", MAX_ACC)
