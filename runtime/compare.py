"""Layer-by-layer comparison of the fake-quant student with the integer graph, in output LSBs (STYLE §10).

Integer-graph nodes are named after the student's fx nodes, so every quantized tensor of the integer
graph has a float counterpart in the student: its fake-quant value divided by the scale is the integer
code the integer graph should hold.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from lower.graph import IntGraph
from train.quant.primitives import round_half_up


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keep: set[str]) -> None:
        super().__init__(gm)
        self.keep, self.values = keep, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.keep:
            self.values[n.name] = out.detach()
        return out


def fakequant_values(student: fx.GraphModule, x: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
    """Outputs of the student's fx nodes `names` on normalized input `x`."""
    rec = _Recorder(student.eval(), names)
    with torch.no_grad():
        rec.run(x)
    return rec.values


def compared_tensors(graph: IntGraph) -> list[str]:
    """The integer graph's quantized tensors (8 bits or fewer): where an LSB is a real rounding step."""
    return [n.name for n in graph.nodes if graph.tensors[n.name].bits <= 8]


def fakequant_codes(graph: IntGraph, name: str, fakequant: torch.Tensor) -> np.ndarray:
    """The integer codes (int32) a fake-quant tensor stands for: it holds scale * (code - zero_point) in
    float32, so value / scale is within a few ulp of an integer, which rounding recovers exactly (a value the
    student did not round, one that is off the grid, would be found as a difference of codes: that is the
    comparison's purpose)."""
    info = graph.tensors[name]
    scale = torch.tensor(info.scale, dtype=torch.float64)
    if scale.numel() > 1:
        scale = scale.reshape((1, -1) + (1,) * (fakequant.dim() - 2))
    q = round_half_up(fakequant.double() / (scale if scale.numel() > 1 else float(scale)))
    return (q.to(torch.int32) + info.zero_point).numpy()


def student_codes(graph: IntGraph, fakequant: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """`fakequant_codes` of every compared tensor the student recorded (computed once per batch)."""
    return {n: fakequant_codes(graph, n, fakequant[n]) for n in compared_tensors(graph) if n in fakequant}


def isolated_layer_diffs(graph: IntGraph, codes: dict[str, np.ndarray], pixels: np.ndarray) -> dict[str, int]:
    """Max LSB difference per quantized tensor when every layer is fed the fake-quant student's codes
    (`student_codes`; so differences do not propagate): what one integer layer alone adds."""
    from lower.reference import run_graph

    worst: dict[str, int] = {}

    def feed(name: str, integer: np.ndarray) -> np.ndarray | None:
        if name not in codes:
            return None
        worst[name] = int(np.abs(codes[name] - integer.astype(np.int32)).max(initial=0))
        return codes[name]

    run_graph(graph, pixels, observe=feed)
    return worst


class LayerDiffs:
    """Running maximum and mismatch fraction of the LSB difference per quantized tensor."""

    def __init__(self, graph: IntGraph, names: list[str] | None = None) -> None:
        self.graph = graph
        self.names = compared_tensors(graph) if names is None else names
        self.max = {n: 0 for n in self.names}
        self.mismatch = {n: 0 for n in self.names}
        self.count = {n: 0 for n in self.names}

    def update(self, codes: dict[str, np.ndarray], integer: dict[str, np.ndarray]) -> None:
        """codes: `student_codes` (or ORT's codes) of a batch; integer: the integer graph's tensors of the same
        images."""
        for n in self.names:
            if n not in codes:  # e.g. a tensor the --for-ort graph added, which the student does not have
                continue
            d = np.abs(codes[n] - integer[n].astype(np.int32))
            self.max[n] = max(self.max[n], int(d.max(initial=0)))
            self.mismatch[n] += int((d > 0).sum())
            self.count[n] += d.size

    def report(self) -> dict[str, dict[str, float]]:
        return {n: {"max_lsb": self.max[n], "mismatch_fraction": self.mismatch[n] / self.count[n]}
                for n in self.names if self.count[n]}
