"""Hand-written TIR schedules for the integer graph's hot ops, one module per instruction set, gathered
into typed `ScheduleSet`s.

`lower.targets` lists the sets a target may use (first match by the target's CPU features wins); the
Relax builder (`lower.tvm_build`) asks the chosen set for each conv2d (and conv2d + requantize pair) it can
handle and falls back to the plain Relax ops (TVM's default loops) for the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tvm import relax
from tvm.relax import op as R

from ..graph import Node, TensorInfo
from . import x86_amx, x86_avx2, x86_conv, x86_depthwise, x86_pool, x86_vnni

if TYPE_CHECKING:
    from ..tvm_build import GraphBuilder


@dataclass(frozen=True)
class ScheduleSet:
    """A set of hand-scheduled kernels for one instruction set: `name` (what `lower.compile --schedules` takes
    and the manifest records), the LLVM CPU `features` it needs, its conv2d kernel families, tried in
    order (a family's `prepare` declines the convs it cannot run exactly), and the vector width in bytes of
    its pooling kernels (`x86_pool`)."""

    name: str
    features: tuple[str, ...]
    conv2d: tuple[x86_conv.Family, ...]
    vector_bytes: int

    def emit_pool(self, b: "GraphBuilder", node: Node, x: relax.Expr) -> relax.Expr:
        """max_pool2d or sum_pool2d `node` as one scheduled kernel."""
        return x86_pool.emit_pool(b, node, x, self.vector_bytes)

    def emit_conv2d(self, b: "GraphBuilder", node: Node, x: relax.Expr, in_info: TensorInfo | None = None
                    ) -> relax.Expr | None:
        """The int32 accumulator of conv2d `node` from the first family that runs it, else None."""
        for family in self.conv2d:
            acc = x86_conv.emit_conv2d(family, b, node, x, in_info)
            if acc is not None:
                return acc
        return None

    def emit_dense(self, b: "GraphBuilder", node: Node, x: relax.Expr) -> relax.Expr | None:
        """The int32 accumulator [n, O] of dense `node` on x [n, K], as a 1x1 conv on a 1x1 image, else None."""
        o, k = (int(d) for d in np.shape(node.params["weight"]))
        conv = Node("conv2d", node.name, node.inputs,
                    {**node.attrs, "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1},
                    {"weight": np.reshape(node.params["weight"], (o, k, 1, 1)), "bias": node.params["bias"]})
        info = b.graph.tensors[node.inputs[0]]
        info = TensorInfo((k, 1, 1), info.dtype, info.bits, info.signed, info.scale, info.zero_point)
        acc = self.emit_conv2d(b, conv, R.reshape(x, [b.batch, 1, 1, k]), info)
        return None if acc is None else R.reshape(acc, [b.batch, o])

    def emit_conv2d_requantize(self, b: "GraphBuilder", conv: Node, rq: Node, x: relax.Expr,
                               terms: list[relax.Expr | None]) -> relax.Expr | None:
        """requantize `rq` of `conv` as one kernel (the requantize fused as its epilogue), else None."""
        for family in self.conv2d:
            y = x86_conv.emit_conv2d_requantize(family, b, conv, rq, x, terms)
            if y is not None:
                return y
        return None


# AMX for the convs it takes (`x86_amx.runs_on_amx`), VNNI for the rest (the 3-channel first conv, dilation)
X86_AMX = ScheduleSet("x86_amx", x86_amx.AMX_FEATURES,
                      (x86_amx.FAMILY, x86_vnni.FAMILY, x86_depthwise.depthwise_family(16)), 64)
X86_VNNI = ScheduleSet("x86_vnni", x86_vnni.VNNI_FEATURES, (x86_vnni.FAMILY, x86_depthwise.depthwise_family(16)),
                       64)
X86_AVX2 = ScheduleSet("x86_avx2", x86_avx2.AVX2_FEATURES, (x86_avx2.FAMILY, x86_depthwise.depthwise_family(8)),
                       32)
SCHEDULE_SETS: dict[str, ScheduleSet] = {s.name: s for s in (X86_AMX, X86_VNNI, X86_AVX2)}
