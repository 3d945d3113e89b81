"""Thin fake-quant modules. State lives in parameters/buffers; the math lives in `primitives`.

Learnable ranges follow LSQ (Esser et al., ICLR 2020) rather than PACT: LSQ learns the step size
itself, which is exactly the number the integer graph consumes (M = s_x*s_w/s_y), works for weights
and activations alike, and its gradient includes the rounding error, which matters at 3-4 bits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import primitives as P
from .spec import QuantSpec


class ActQuantizer(nn.Module):
    """Per-tensor fake quantizer for activations (and the network input).

    `enabled` is an explicit, documented switch used by calibration (`quantization_disabled`), never
    flipped inside forward.
    """

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        if spec.granularity != "tensor":
            raise ValueError("activation quantizers are per tensor")
        self.spec = spec
        self.enabled = True
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        g = P.lsq_grad_factor(x[0].numel(), self.spec.qmax)
        return P.fake_quantize(x, self.scale, self.zero_point, self.spec, grad_factor=g)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, signed={self.spec.signed}, symmetric={self.spec.symmetric}"


MIN_STEP = 1e-8  # the smallest learned step an update may leave (the integer graph needs every step > 0)


def keep_steps_positive(model: nn.Module) -> None:
    """Clamp every learned step of `model`'s quantizers to >= MIN_STEP; called after each optimizer update.
    Adam moves a parameter by about its learning rate whatever its size, so a tiny calibrated step (4e-5 for a
    near-dead ResNet56 channel against the 1e-4 step-size rate) crossed zero in one KD update: the fake-quant
    student still ran (the sign cancels in s * round(w / s)), but it could not be lowered. A step held at
    MIN_STEP quantizes its channel to ~0, which is what a collapsed step means, in both graphs."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (ActQuantizer, WeightQuantizer)):
                m.scale.clamp_(min=MIN_STEP)


class WeightQuantizer(nn.Module):
    """Symmetric fake quantizer for a conv/linear weight: one step per output channel (the integer
    protocol), or one per tensor (the paper's protocol: its learned step is the learnable clip)."""

    def __init__(self, spec: QuantSpec, out_channels: int) -> None:
        super().__init__()
        if not spec.symmetric:
            raise ValueError("weight quantizers are symmetric")
        self.spec = spec
        self.enabled = True
        n = out_channels if spec.granularity == "channel" else 1
        self.scale = nn.Parameter(torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        g = P.lsq_grad_factor(w[0].numel(), self.spec.qmax)
        return P.fake_quantize(w, self.scale, self.zero_point, self.spec, axis=0, grad_factor=g)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, {self.spec.granularity}, scales={self.scale.numel()}"


class QuantConv2d(nn.Conv2d):
    """Conv2d (BN already folded in) whose weight is fake-quantized; the input arrives quantized."""

    def __init__(self, conv: nn.Conv2d, spec: QuantSpec) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, True, conv.padding_mode)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            self.bias.copy_(conv.bias if conv.bias is not None else torch.zeros(conv.out_channels))
        self.weight_quantizer = WeightQuantizer(spec, conv.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QuantLinear(nn.Linear):
    """Linear whose weight is fake-quantized; the input arrives quantized."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec) -> None:
        super().__init__(linear.in_features, linear.out_features, True)
        with torch.no_grad():
            self.weight.copy_(linear.weight)
            self.bias.copy_(linear.bias if linear.bias is not None else torch.zeros(linear.out_features))
        self.weight_quantizer = WeightQuantizer(spec, linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


QUANTIZERS = (ActQuantizer, WeightQuantizer)


class quantization_disabled:
    """Context manager: run a student as its float (BN-folded) network, e.g. for range calibration."""

    def __init__(self, model: nn.Module) -> None:
        self.quantizers = [m for m in model.modules() if isinstance(m, QUANTIZERS)]

    def __enter__(self) -> None:
        self.saved = [q.enabled for q in self.quantizers]
        for q in self.quantizers:
            q.enabled = False

    def __exit__(self, *exc: object) -> None:
        for q, e in zip(self.quantizers, self.saved):
            q.enabled = e
