"""Hand-written TIR schedules for the integer graph's hot ops, one module per instruction set, gathered
into typed `ScheduleSet`s.

`lower.targets` lists the sets a target may use (first match by the target's CPU features wins); the
Relax builder (`lower.tvm_build`) asks the chosen set for each conv2d (and conv2d + requantize pair) it can
handle and falls back to the plain Relax ops (TVM's default loops) for the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tvm import relax

from ..graph import Node
from . import x86_avx2, x86_conv, x86_vnni

if TYPE_CHECKING:
    from ..tvm_build import GraphBuilder


@dataclass(frozen=True)
class ScheduleSet:
    """A set of hand-scheduled kernels for one instruction set: `name` (what `lower.compile --schedules` takes
    and the manifest records), the LLVM CPU `features` it needs, and its conv2d kernel families, tried in
    order (a family's `prepare` declines the convs it cannot run exactly)."""

    name: str
    features: tuple[str, ...]
    conv2d: tuple[x86_conv.Family, ...]

    def emit_conv2d(self, b: "GraphBuilder", node: Node, x: relax.Expr) -> relax.Expr | None:
        """The int32 accumulator of conv2d `node` from the first family that runs it, else None."""
        for family in self.conv2d:
            acc = x86_conv.emit_conv2d(family, b, node, x)
            if acc is not None:
                return acc
        return None

    def emit_conv2d_requantize(self, b: "GraphBuilder", conv: Node, rq: Node, x: relax.Expr,
                               terms: list[relax.Expr | None]) -> relax.Expr | None:
        """requantize `rq` of `conv` as one kernel (the requantize fused as its epilogue), else None."""
        for family in self.conv2d:
            y = x86_conv.emit_conv2d_requantize(family, b, conv, rq, x, terms)
            if y is not None:
                return y
        return None


X86_VNNI = ScheduleSet("x86_vnni", x86_vnni.VNNI_FEATURES, (x86_vnni.FAMILY,))
X86_AVX2 = ScheduleSet("x86_avx2", x86_avx2.AVX2_FEATURES, (x86_avx2.FAMILY,))
SCHEDULE_SETS: dict[str, ScheduleSet] = {s.name: s for s in (X86_VNNI, X86_AVX2)}
