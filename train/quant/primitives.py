"""Pure quantization math shared by training (fake-quant) and lowering (integer graph).

Conventions (one place, used everywhere):
- real = scale * (q - zero_point); q is an integer in spec.qrange.
- rounding is half-up, floor(x + 0.5), the same as the integer requantizer below, so that
  ties round the same way in the fake-quant student and in the deployed integer graph.
- per-channel tensors use axis 0 (output channels) for scale/zero_point.

No nn.Module here: every function maps tensors to tensors.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .spec import QuantSpec

_EPS = 1e-12
DYADIC_BITS = 31  # M0 is a 31-bit unsigned integer in [2^30, 2^31)
MAX_SHIFT = 62


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    """floor(x + 0.5), computed without the float rounding of `x + 0.5` (exact for every float32).

    >>> round_half_up(torch.tensor([0.5, 1.5, -0.5, -1.5, 2.4, 0.49999997])).tolist()
    [1.0, 2.0, 0.0, -1.0, 2.0, 0.0]
    """
    f = torch.floor(x)
    return f + (x - f >= 0.5).to(x.dtype)


def _broadcast(p: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """Reshape a per-channel parameter so it broadcasts along `axis` of `x` (scalars pass through)."""
    p = torch.as_tensor(p, dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
    if p.dim() == 0 or x.dim() == 0:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def choose_qparams(min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map [min_val, max_val] onto spec.qrange (the range always includes 0).

    >>> s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), QuantSpec(bits=8, signed=False, symmetric=False))
    >>> round(s.item(), 6), int(z)
    (0.015686, 64)
    >>> s, z = choose_qparams(torch.tensor(-2.0), torch.tensor(1.0), QuantSpec(bits=4, signed=True, narrow_range=True))
    >>> round(s.item(), 6), int(z)
    (0.285714, 0)
    """
    min_val = torch.clamp(torch.as_tensor(min_val, dtype=torch.float32), max=0.0)
    max_val = torch.clamp(torch.as_tensor(max_val, dtype=torch.float32), min=0.0)
    if spec.symmetric:
        amax = torch.maximum(-min_val, max_val) if spec.signed else max_val
        scale = torch.clamp(amax / spec.qmax, min=_EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((max_val - min_val) / (spec.qmax - spec.qmin), min=_EPS)
    zero_point = torch.clamp(spec.qmin - round_half_up(min_val / scale), spec.qmin, spec.qmax)
    return scale, zero_point.to(torch.int32)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec, axis: int = 0) -> torch.Tensor:
    """q = clamp(round_half_up(x / scale) + zero_point, qmin, qmax), as int32.

    >>> quantize(torch.tensor([0.26, -0.1, 9.0]), torch.tensor(0.5), torch.tensor(0), QuantSpec(bits=4, signed=True)).tolist()
    [1, 0, 7]
    """
    s = _broadcast(scale, x, axis)
    z = _broadcast(zero_point, x, axis)
    q = torch.clamp(round_half_up(x / s) + z, spec.qmin, spec.qmax)
    return q.to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """real = scale * (q - zero_point).

    >>> dequantize(torch.tensor([1, 0, 7]), torch.tensor(0.5), torch.tensor(0)).tolist()
    [0.5, 0.0, 3.5]
    """
    qf = q.to(torch.float32)
    return _broadcast(scale, qf, axis) * (qf - _broadcast(zero_point, qf, axis))


def _scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Exactly `x` in the forward pass; gradient multiplied by `factor` in the backward pass."""
    scaled = x * factor
    return x.detach() + (scaled - scaled.detach())


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    axis: int = 0,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """dequantize(quantize(x)) in float — bit for bit — differentiable with the LSQ estimator
    (Esser et al. 2020).

    Computed as s * round(clamp(x/s, qmin - z, qmax - z)): clamping before rounding gives the same value
    (the bounds are integers) and the LSQ gradients: d/dx = 1 where qmin <= x/s + z <= qmax, else 0
    (straight-through rounding); d/dscale = round(x/s) - x/s inside, and qmin - z or qmax - z where
    clipped, times `grad_factor` (LSQ uses 1/sqrt(numel * qmax)). The zero point is not learned.

    >>> fake_quantize(torch.tensor([0.26, -0.1, 9.0]), torch.tensor(0.5), torch.tensor(0), QuantSpec(bits=4, signed=True)).tolist()
    [0.5, 0.0, 3.5]
    """
    s = _broadcast(_scale_gradient(scale, grad_factor), x, axis)
    z = _broadcast(zero_point, x, axis).detach().to(x.dtype)
    u = torch.clamp(x / s, min=spec.qmin - z, max=spec.qmax - z)
    u = u + (round_half_up(u) - u).detach()  # straight-through rounding
    return u * s


def lsq_grad_factor(numel: int, qmax: int) -> float:
    """LSQ's step-size gradient scale 1/sqrt(N * Qp)."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qmax, 1))


def dyadic_multiplier(m: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Represent positive real multipliers as M0 * 2^-shift, M0 an int in [2^30, 2^31).

    Returned as int64 arrays of m's shape. Relative error <= 2^-31.

    >>> m0, n = dyadic_multiplier(0.1)
    >>> int(m0), int(n), int(m0) / 2 ** int(n)
    (1717986918, 34, 0.09999999997671694)
    """
    m = np.asarray(m, dtype=np.float64)
    if np.any(~np.isfinite(m)) or np.any(m <= 0):
        raise ValueError("dyadic multipliers must be finite and positive")
    frac, exp = np.frexp(m)  # m = frac * 2^exp, frac in [0.5, 1)
    m0 = np.floor(frac * 2.0**DYADIC_BITS + 0.5).astype(np.int64)
    carry = m0 == 2**DYADIC_BITS
    m0 = np.where(carry, m0 // 2, m0)
    shift = DYADIC_BITS - (exp.astype(np.int64) + carry)
    if np.any(shift < 0):
        raise ValueError(f"multiplier {m.max()} >= 2^31 cannot be represented")
    # very small multipliers: give up low bits of M0 rather than shift past int64
    excess = np.maximum(shift - MAX_SHIFT, 0)
    m0 = np.floor(m0 / 2.0**excess + 0.5).astype(np.int64)
    shift = shift - excess
    return m0, shift


def requantize(
    acc: torch.Tensor,
    multiplier: torch.Tensor,
    shift: torch.Tensor,
    zero_point: int,
    qmin: int,
    qmax: int,
    axis: int = 1,
) -> torch.Tensor:
    """q = clamp(zero_point + ((acc * M0 + 2^(shift-1)) >> shift), qmin, qmax) in int64.

    `>>` is an arithmetic shift (floor), so the result is round-half-up of acc * M0 / 2^shift.
    multiplier/shift are scalars or per-channel along `axis` (axis 1 for NCHW activations).
    |acc| < 2^31 and M0 < 2^31 keep the product inside int64.

    >>> requantize(torch.tensor([10, 15, -10, 1000]), torch.tensor(1 << 30), torch.tensor(32), 0, -8, 7, axis=0).tolist()
    [3, 4, -2, 7]
    """
    acc = acc.to(torch.int64)

    def per_channel(p: torch.Tensor) -> torch.Tensor:
        p = torch.as_tensor(p, dtype=torch.int64, device=acc.device)
        if p.dim() == 0:
            return p
        shape = [1] * acc.dim()
        shape[axis] = -1
        return p.reshape(shape)

    m0, n = per_channel(multiplier), per_channel(shift)
    rounding = torch.where(n > 0, torch.ones_like(n) << torch.clamp(n - 1, min=0), torch.zeros_like(n))
    q = torch.bitwise_right_shift(acc * m0 + rounding, n) + zero_point
    return torch.clamp(q, qmin, qmax)
