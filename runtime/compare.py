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
from train.quant.primitives import round_half_up_np


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
    """The integer codes a fake-quant tensor stands for (it holds scale * (code - zero_point))."""
    info = graph.tensors[name]
    f = fakequant.double().numpy()
    scale = np.asarray(info.scale, np.float64)
    if scale.size > 1:
        scale = scale.reshape((1, -1) + (1,) * (f.ndim - 2))
    return (round_half_up_np(f / scale) + info.zero_point).astype(np.int64)


def lsb_diff(graph: IntGraph, name: str, fakequant: torch.Tensor, integer: np.ndarray) -> np.ndarray:
    """|integer code - fake-quant code| of one tensor, elementwise, as int64."""
    return np.abs(fakequant_codes(graph, name, fakequant) - integer.astype(np.int64))


def isolated_layer_diffs(graph: IntGraph, fakequant: dict[str, torch.Tensor], pixels: np.ndarray) -> dict[str, int]:
    """Max LSB difference per quantized tensor when every layer is fed the fake-quant student's codes
    (so differences do not propagate): what one integer layer alone adds."""
    from lower.reference import run_graph

    worst: dict[str, int] = {}

    def feed(name: str, integer: np.ndarray) -> np.ndarray | None:
        if name not in fakequant:
            return None
        codes = fakequant_codes(graph, name, fakequant[name])
        worst[name] = int(np.abs(codes - integer.astype(np.int64)).max(initial=0))
        return codes

    run_graph(graph, pixels, observe=feed)
    return worst


class LayerDiffs:
    """Running maximum and mismatch fraction of the LSB difference per quantized tensor."""

    def __init__(self, graph: IntGraph) -> None:
        self.graph = graph
        self.names = compared_tensors(graph)
        self.max = {n: 0 for n in self.names}
        self.mismatch = {n: 0 for n in self.names}
        self.count = {n: 0 for n in self.names}

    def update(self, fakequant: dict[str, torch.Tensor], integer: dict[str, np.ndarray]) -> None:
        for n in self.names:
            d = lsb_diff(self.graph, n, fakequant[n], integer[n])
            self.max[n] = max(self.max[n], int(d.max(initial=0)))
            self.mismatch[n] += int((d > 0).sum())
            self.count[n] += d.size

    def report(self) -> dict[str, dict[str, float]]:
        return {n: {"max_lsb": self.max[n], "mismatch_fraction": self.mismatch[n] / max(self.count[n], 1)}
                for n in self.names}
