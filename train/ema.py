"""Exponential moving average of the student during fine-tuning (`train.dfqf --s-ema`)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(half_life_fraction: float, steps: int) -> float:
    """Per-step decay of an EMA whose half-life is `half_life_fraction` of `steps` (0 disables: 0.0).

    The same setting then averages over the same share of a run of any length, e.g. 0.05 of 400 steps
    is a half-life of 20 steps: decay = 0.5 ** (1 / 20) = 0.9659; of 4000 steps, 0.99827.

    >>> round(ema_decay(0.05, 400), 4), ema_decay(0.0, 400)
    (0.9659, 0.0)
    """
    if half_life_fraction <= 0:
        return 0.0
    return 0.5 ** (1.0 / max(half_life_fraction * steps, 1e-9))


class StudentEMA:
    """Exponential moving average of a student's floating-point state: weights, biases, LSQ step sizes.

    After every optimizer step, ema <- decay * ema + (1 - decay) * student for each float tensor of the
    state dict; integer buffers (zero points) are copied. The average is a separate model (`self.model`)
    so it can be evaluated and saved as it is; without BN in the student it has no statistics to
    recompute. Averaging smooths the step-to-step noise of small-batch distillation on a frozen set.
    """

    def __init__(self, student: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(student).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def reset(self, student: nn.Module) -> None:
        self.model.load_state_dict(student.state_dict())

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        for avg, now in zip(self.model.state_dict().values(), student.state_dict().values()):
            if avg.is_floating_point():
                avg.lerp_(now, 1.0 - self.decay)
            else:
                avg.copy_(now)
