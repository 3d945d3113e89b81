"""Pure quantization math shared by training (fake-quant) and lowering (integer graph).

Conventions (one place, used everywhere):
- real = scale * (q - zero_point); q is an integer in spec.qrange.
- rounding is half-up, floor(x + 0.5), the same as the integer requantizer below, so that
  ties round the same way in the fake-quant student and in the deployed integer graph (`round_half_up`
  for tensors, `round_half_up_np` for NumPy arrays).
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
    m0 = round_half_up_np(frac * 2.0**DYADIC_BITS).astype(np.int64)
    carry = m0 == 2**DYADIC_BITS
    m0 = np.where(carry, m0 // 2, m0)
    shift = DYADIC_BITS - (exp.astype(np.int64) + carry)
    if np.any(shift < 0):
        raise ValueError(f"multiplier {m.max()} >= 2^31 cannot be represented")
    # very small multipliers: give up low bits of M0 rather than shift past int64
    excess = np.maximum(shift - MAX_SHIFT, 0)
    m0 = round_half_up_np(m0 / 2.0**excess).astype(np.int64)
    shift = shift - excess
    return m0, shift


def round_half_up_np(x: np.ndarray | float) -> np.ndarray:
    """NumPy float64 `round_half_up`: floor(x + 0.5) without the float rounding of `x + 0.5`.

    >>> round_half_up_np(np.array([0.5, 1.5, -0.5, -1.5, 2.4, 0.49999999999999994])).tolist()
    [1.0, 2.0, 0.0, -1.0, 2.0, 0.0]
    """
    x = np.asarray(x, dtype=np.float64)
    f = np.floor(x)
    return f + (x - f >= 0.5)


INT64_LIMIT = 2**63 - 1


def joint_dyadic(m: np.ndarray, bounds: np.ndarray, bias: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multipliers M0[i, c], shifts n_c and offsets o_c with m[i, c] ~ M0[i, c] / 2^n_c and
    bias[c] ~ o_c / 2^n_c (bias in output steps) for `requantize`: per column c the largest n_c with every
    M0 < 2^31 and sum_i bounds[i] * M0[i, c] + |o_c| + 2^(n_c - 1) < 2^63 (bounds[i]: max |t_i - zp_i|), so
    the int64 requantizer cannot overflow.

    >>> m0, n, o = joint_dyadic(np.array([[0.1], [0.05]]), np.array([1000, 100], dtype=object), np.array([0.25]))
    >>> m0[:, 0].tolist(), n.tolist(), o.tolist()
    ([1717986918, 858993459], [34], [4294967296])
    """
    bias = np.zeros(m.shape[1]) if bias is None else np.asarray(bias, np.float64)
    _, shift = dyadic_multiplier(m.max(axis=0))  # the largest term sets the precision
    multiplier = np.zeros(m.shape, dtype=np.int64)
    offset = np.zeros(m.shape[1], dtype=np.int64)
    for c in range(m.shape[1]):
        n = int(shift[c])
        while True:
            col = [int(x) for x in round_half_up_np(m[:, c] * 2.0**n)]
            off = int(round_half_up_np(bias[c] * 2.0**n))
            worst = sum(int(b) * x for b, x in zip(bounds, col)) + abs(off) + (1 << max(n - 1, 0))
            if max(col) < 2**31 and worst <= INT64_LIMIT:
                break
            if n == 0:
                raise ValueError("requantization multiplier too large for an int64 requantizer")
            n -= 1
        multiplier[:, c], shift[c], offset[c] = col, n, off
    return multiplier, shift.astype(np.int64), offset


def requantize(terms: list[np.ndarray], multiplier: np.ndarray, shift: np.ndarray, offset: np.ndarray,
               input_zero_points, output_zero_point: int, qmin: int, qmax: int, axis: int = 1) -> np.ndarray:
    """The integer requantizer, in int64 (what every backend computes bit for bit):

        clamp(zp_out + ((sum_i (t_i - zp_i) * M0[i, c] + offset[c] + 2^(n_c - 1)) >> n_c), qmin, qmax)

    with c along `axis` (multiplier [k, C], shift [C], offset [C]; C = 1 is per tensor) and no rounding
    term where n_c = 0. `>>` is an arithmetic shift (floor), so this is round-half-up of the exact real sum:
    residual adds, ReLU (qmin = zp_out), the bias (offset) and the scale change are one rounding.
    `joint_dyadic` chooses shifts that keep the int64 sum in range (no overflow check here).

    >>> requantize([np.array([[10, 15, -10, 1000]])], np.array([[1 << 30]]), np.array([32]), np.array([0]), [0], 0, -8, 7).tolist()
    [[3, 4, -2, 7]]
    """
    m = np.asarray(multiplier, np.int64).reshape(len(terms), -1)
    rank = max(np.ndim(t) for t in terms)

    def along(p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, np.int64).reshape(-1)
        if p.size == 1:
            return p.reshape(())
        shape = [1] * rank
        shape[axis] = -1
        return p.reshape(shape)

    acc = np.zeros(np.broadcast_shapes(*(np.shape(t) for t in terms)), dtype=np.int64)
    for i, t in enumerate(terms):  # in place: one temporary per term
        term = np.subtract(t, int(input_zero_points[i]), dtype=np.int64)
        term *= along(m[i])
        acc += term
    n = along(shift)
    acc += along(offset) + np.where(n > 0, np.left_shift(np.int64(1), np.maximum(n - 1, 0)), 0)
    acc >>= n
    acc += output_zero_point
    return np.clip(acc, qmin, qmax, out=acc)
