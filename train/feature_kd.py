"""Intermediate-feature distillation of the fake-quant student (an optional term of DFQF's stage 2).

Every activation quantizer of the student is named after the teacher's fx node it quantizes
(`<node>_aq`, DESIGN §5), so the pairs are found by name: the student's quantized tensor at `<node>_aq`
against the teacher's float tensor at `<node>`. Quantizers whose node has no teacher counterpart (the
input quantizer, nodes folded away with BN) are skipped.

The loss of one pair is the mean squared error divided by the teacher feature's mean square, so that every
layer counts about equally whatever its scale; the term is the mean over pairs.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .quant.fold import trace
from .quant.modules import ActQuantizer


class TeacherFeatures(nn.Module):
    """A traced teacher returning (logits, [features at `nodes`]) from one forward pass (changes `gm`)."""

    def __init__(self, gm: fx.GraphModule, nodes: list[str]) -> None:
        super().__init__()
        by_name = {n.name: n for n in gm.graph.nodes}
        output = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(output):
            taps = gm.graph.call_function(list, ([by_name[n] for n in nodes],))
        output.args = ((output.args[0], taps),)
        gm.recompile()
        self.gm = gm

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.gm(x)


class FeatureDistiller:
    """Pairs the student's activation quantizers with the teacher's nodes and computes the feature loss.

    `student_features` hooks stay on the student while this object lives (`remove()` takes them off);
    each forward of the student records its quantized features, `loss()` consumes them.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module) -> None:
        gm = trace(teacher)
        teacher_nodes = {n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")}
        self.pairs: list[tuple[str, str]] = []  # (student quantizer module, teacher node)
        for name, m in student.named_modules():
            node = name.removesuffix("_aq")
            if isinstance(m, ActQuantizer) and node != name and node in teacher_nodes:
                self.pairs.append((name, node))
        if not self.pairs:
            raise ValueError("no student activation quantizer matches a teacher node: feature distillation "
                             "needs a student built from this teacher")
        self.teacher = TeacherFeatures(gm, [node for _, node in self.pairs])
        modules = dict(student.named_modules())
        self.recorded: dict[str, torch.Tensor] = {}
        self.hooks = [modules[q].register_forward_hook(self._hook(q)) for q, _ in self.pairs]

    def _hook(self, name: str):
        def record(_m: nn.Module, _args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            self.recorded[name] = out
        return record

    @torch.no_grad()
    def teacher_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.teacher(x)

    def loss(self, teacher_features: list[torch.Tensor]) -> torch.Tensor:
        """Mean over pairs of ||s − t||² / ||t||² (per element means); clears the recorded features."""
        missing = [q for q, _ in self.pairs if q not in self.recorded]
        if missing:
            raise ValueError(f"student features not recorded for {missing}: run the student first")
        terms = []
        for (q, _), t in zip(self.pairs, teacher_features):
            s = self.recorded[q].float()
            t = t.float()
            terms.append((s - t).pow(2).mean() / t.pow(2).mean().clamp(min=1e-12))
        self.recorded = {}
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.recorded = {}
