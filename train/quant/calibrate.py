"""Range calibration: set every quantizer's scale (and zero point) before fine-tuning or deployment.

Weights are calibrated from the weights themselves; activations from a float pass of the BN-folded
student (all quantizers disabled) over whatever batches the caller provides — Gaussian noise, distilled
images, generator samples or (for the non-data-free upper bound) real images.
Observers: `minmax` (the range seen) and `mse` (the clipped range minimizing quantization MSE).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from . import primitives as P
from .modules import ActQuantizer, WeightQuantizer, quantization_disabled
from .spec import QuantSpec

OBSERVERS = ("minmax", "mse")
_ALPHAS = torch.linspace(0.05, 1.0, 96)
_MAX_SAMPLES = 1 << 20


def _check(observer: str) -> None:
    if observer not in OBSERVERS:
        raise ValueError(f"unknown observer {observer!r}; supported: {', '.join(OBSERVERS)}")


def _quant_error(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, axis: int) -> torch.Tensor:
    """Mean squared fake-quant error, per channel along `axis` (x: [C, K]) when lo/hi are vectors."""
    s, z = P.choose_qparams(lo, hi, spec)
    err = (P.fake_quantize(x, s, z, spec, axis=axis) - x) ** 2
    return err.mean(dim=1) if axis == 0 and err.dim() > 1 else err.mean()


@torch.no_grad()
def weight_range(w: torch.Tensor, spec: QuantSpec, observer: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) per output channel (or of the whole tensor for a per-tensor spec), clipped by the MSE
    search when asked."""
    _check(observer)
    flat = w.detach().reshape(w.shape[0] if spec.granularity == "channel" else 1, -1).float()
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    if observer == "minmax":
        return lo, hi
    errs = torch.stack([_quant_error(flat, a * lo, a * hi, spec, axis=0) for a in _ALPHAS])  # [A, C]
    best = _ALPHAS[errs.argmin(dim=0)]
    return best * lo, best * hi


@torch.no_grad()
def activation_range(sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec,
                     observer: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor (min, max): the observed range, or its MSE-optimal clipping on a value sample."""
    _check(observer)
    if observer == "minmax":
        return lo, hi
    errs = torch.stack([_quant_error(sample, a * lo, a * hi, spec, axis=-1) for a in _ALPHAS])
    a = _ALPHAS[errs.argmin()]
    return a * lo, a * hi


def set_qparams(q: ActQuantizer | WeightQuantizer, lo: torch.Tensor, hi: torch.Tensor) -> None:
    scale, zero_point = P.choose_qparams(lo, hi, q.spec)
    with torch.no_grad():
        q.scale.copy_(scale.reshape(q.scale.shape))
        q.zero_point.copy_(zero_point.reshape(q.zero_point.shape))


def calibrate_weights(student: nn.Module, observer: str = "minmax") -> None:
    for m in student.modules():
        if isinstance(getattr(m, "weight_quantizer", None), WeightQuantizer):
            set_qparams(m.weight_quantizer, *weight_range(m.weight, m.weight_quantizer.spec, observer))


class _ActivationStats:
    """Running min/max of one quantizer's input, plus a bounded random sample of its values."""

    def __init__(self) -> None:
        self.lo = torch.tensor(float("inf"))
        self.hi = torch.tensor(float("-inf"))
        self.samples: list[torch.Tensor] = []
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().float().flatten().cpu()
        self.lo, self.hi = torch.minimum(self.lo, x.min()), torch.maximum(self.hi, x.max())
        keep = min(x.numel(), max(_MAX_SAMPLES // 8, 1))
        if self.count < _MAX_SAMPLES:
            self.samples.append(x[torch.randperm(x.numel())[:keep]])
            self.count += keep

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)


@torch.no_grad()
def calibrate_activations(student: nn.Module, batches: Iterable[torch.Tensor], observer: str = "minmax") -> int:
    """Run `batches` through the float student and set every ActQuantizer's range. Returns #images."""
    _check(observer)
    quantizers = {name: m for name, m in student.named_modules() if isinstance(m, ActQuantizer)}
    stats = {name: _ActivationStats() for name in quantizers}
    hooks = [m.register_forward_pre_hook(stats[name]) for name, m in quantizers.items()]
    n = 0
    was_training = student.training
    student.eval()
    try:
        with quantization_disabled(student):
            for x in batches:
                student(x)
                n += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
        student.train(was_training)
    if n == 0:
        raise ValueError("calibration needs at least one batch")
    for name, q in quantizers.items():
        st = stats[name]
        set_qparams(q, *activation_range(st.sample(), st.lo, st.hi, q.spec, observer))
    return n


def calibrate(student: nn.Module, batches: Iterable[torch.Tensor], observer: str = "minmax",
              weight_observer: str | None = None) -> int:
    """Weights then activations. Returns the number of calibration images used."""
    calibrate_weights(student, weight_observer or observer)
    return calibrate_activations(student, batches, observer)
