"""A default CPU schedule for elementwise kernels: inline every injective block, parallelize the outer loop.

TVM's default llvm pipeline schedules nothing: a fused chain of Relax elementwise ops (requantize: cast,
subtract, multiply, add, shift, clip; layout changes; the int4 unpack) keeps one full-size intermediate
buffer per op and one pass over memory per op. This dlight rule inlines them into one loop nest. It only
touches functions whose blocks are all injective, so reductions (TVM's default conv2d) are left as they
were, and a weight unpack is never inlined into a conv window (it stays one pass per call).
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target


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
                sch.parallel(loops[0])
        return sch


def passes() -> list:
    from tvm.s_tir import dlight as dl

    return [dl.ApplyDefaultSchedule(InlineInjective())]
