"""A default CPU schedule for elementwise kernels: inline every injective block, parallelize the outer loop,
vectorize the inner one.

TVM's default llvm pipeline schedules nothing: a fused chain of Relax elementwise ops (requantize: cast,
subtract, multiply, add, shift, clip; layout changes; the int4 unpack) keeps one full-size intermediate
buffer per op and one pass over memory per op. This dlight rule inlines them into one loop nest. It only
touches functions whose blocks are all injective, so reductions (TVM's default conv2d) are left as they
were, and a weight unpack is never inlined into a conv window (it stays one pass per call).

Vectorizing matters for requantize, whose int64 multiply, variable shift and clip per element otherwise run
as scalar code (AVX-512 has vpmullq/vpsravq, so the vector form is the same exact int64 arithmetic). The
builder keeps activations channels-last, so the inner loop is the channel axis (16-64 here): it is
vectorized whole when it has at most `MAX_LANES` iterations, else split by the largest power of two
dividing it; other inner extents are left scalar.
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

MAX_LANES = 64


def _vectorize_inner(sch: s_tir.Schedule, loop: s_tir.LoopRV) -> None:
    extent = sch.get(loop).extent
    if not isinstance(extent, tirx.IntImm) or extent.value < 4:
        return
    n = int(extent.value)
    if n > MAX_LANES:
        factor = next((f for f in (MAX_LANES, 32, 16, 8) if n % f == 0), None)
        if factor is None:
            return
        loop = sch.split(loop, [None, factor])[1]
    sch.vectorize(loop)


class InlineInjective(CPUScheduleRule):
    """All-injective PrimFuncs -> one loop nest per output, outermost loop parallel."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if blocks is None or not blocks or not all(b.is_injective() for b in blocks):
            return None
        if any(sch.get(b.block_rv).init is not None for b in blocks):  # a reduction over a size-1 domain
            return None
        for block in try_inline(sch, blocks):
            loops = sch.get_loops(block.block_rv)
            if loops:
                if len(loops) > 1:
                    _vectorize_inner(sch, loops[-1])
                sch.parallel(loops[0])
        return sch


def passes() -> list:
    from tvm.s_tir import dlight as dl

    return [dl.ApplyDefaultSchedule(InlineInjective())]
