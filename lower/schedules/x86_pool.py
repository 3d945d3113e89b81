"""Max pooling and sum pooling (global average pooling's integer sum) for x86 SIMD, NHWC.

Exact form, as `lower/reference.py`: max_pool2d[n, y, x, c] = max over the kh x kw window at (y*sh - ph,
x*sw - pw) of x[n, ., ., c], where a tap outside the image never wins (its value is the dtype's minimum);
sum_pool2d[n, y, x, c] = the int32 sum of the window at (y*sh, x*sw) (no padding). Both are exact in the
storage dtype / int32 for every input (a window of up to 2^23 taps of 255 fits int32).

TVM's default loops run the window reduction one scalar channel at a time. Here the channels are the
vector axis (64 uint8 lanes of a zmm for max, 16 int32 lanes for sum; half with AVX2), the window loops sit
outside it, and batch x output rows are the parallel tasks. A padded tap is a branch on its (scalar) position
that yields the minimum without loading: no padded copy of the input and no load outside it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tvm import relax, te, tirx
from tvm.s_tir import Schedule

from ..graph import Node
from .x86_conv import OPAQUE, out_hw

if TYPE_CHECKING:
    from ..tvm_build import GraphBuilder

POOL_OPS = ("max_pool2d", "sum_pool2d")


def out_dtype(op: str, dtype: str) -> str:
    return dtype if op == "max_pool2d" else "int32"


def pooled_hw(hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
              ) -> tuple[int, int]:
    """The output size: the conv formula (`x86_conv.out_hw`) on the padded map."""
    return out_hw(tuple(d + 2 * p for d, p in zip(hw, padding)), kernel, stride, (1, 1))


def lanes_for(channels: int, dtype: str, vector_bytes: int) -> int:
    """The widest vector of `dtype` lanes, at most `vector_bytes`, whose lane count divides `channels`
    (1: scalar channels)."""
    lanes = vector_bytes // np.dtype(dtype).itemsize
    while lanes > 1 and channels % lanes:
        lanes //= 2
    return lanes


def pool_nhwc(batch: tirx.Var, op: str, hwc: tuple[int, int, int], dtype: str, kernel: tuple[int, int],
              stride: tuple[int, int], padding: tuple[int, int] = (0, 0), vector_bytes: int = 64
              ) -> tirx.PrimFunc:
    """The scheduled kernel: x [batch, H, W, C] `dtype` -> [batch, OH, OW, C] (max: `dtype`; sum: int32)."""
    if op not in POOL_OPS:
        raise ValueError(f"unknown pooling op {op}")
    (h, w, c), (kh, kw), (sh, sw), (ph, pw) = hwc, kernel, stride, padding
    oh, ow = pooled_hw((h, w), kernel, stride, padding)
    x = te.placeholder((batch, h, w, c), dtype, name="x")
    rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    if op == "max_pool2d":
        lowest = tirx.min_value(dtype)

        def window(n, y, z, ch):
            iy, iz = y * sh + rh - ph, z * sw + rw - pw
            inside = tirx.all(iy >= 0, iy < h, iz >= 0, iz < w)  # lazy: a padded tap loads nothing
            return te.max(tirx.if_then_else(inside, x[n, iy, iz, ch], lowest), axis=[rh, rw])
    else:
        def window(n, y, z, ch):
            return te.sum(x[n, y * sh + rh, z * sw + rw, ch].astype("int32"), axis=[rh, rw])

    pool = te.compute((batch, oh, ow, c), window, name="pool")
    func = te.create_prim_func([x, pool])
    return _schedule(func, lanes_for(c, out_dtype(op, dtype), vector_bytes))


def _schedule(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc:
    sch = Schedule(func)
    block = sch.get_sblock("pool")
    n, y, z, ch, rh, rw = sch.get_loops(block)
    rows = sch.fuse(n, y)
    sch.parallel(rows)
    if lanes > 1:
        cho, chi = sch.split(ch, [None, lanes])
        sch.reorder(z, cho, rh, rw, chi)  # the window outside the channel vector
        sch.vectorize(chi)  # while the block is still a reduction block (with its init)
        sch.decompose_reduction(block, rh)  # the init's copy of the channel loop stays vectorized
    else:
        sch.reorder(z, ch, rh, rw)
    return sch.mod["main"]


def emit_pool(b: "GraphBuilder", node: Node, x: relax.Expr, vector_bytes: int) -> relax.Expr:
    """max_pool2d / sum_pool2d `node` on x [n, H, W, C] (the builder's NHWC storage) as one scheduled kernel."""
    info = b.graph.tensors[node.inputs[0]]
    c, h, w = (int(d) for d in info.shape)
    a = node.attrs
    kernel, stride = tuple(int(k) for k in a["kernel"]), tuple(int(s) for s in a["stride"])
    padding = tuple(int(p) for p in a.get("padding", (0, 0)))
    func = pool_nhwc(b.batch, node.op, (h, w, c), info.dtype, kernel, stride, padding, vector_bytes)
    gv = b.bb.add_func(func.with_attrs({"op_pattern": OPAQUE, "tirx.is_scheduled": True}), f"{node.name}_pool")
    oh, ow = pooled_hw((h, w), kernel, stride, padding)
    return relax.call_tir(gv, [x], relax.TensorType([b.batch, oh, ow, c], out_dtype(node.op, info.dtype)))
