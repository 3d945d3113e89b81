"""`QuantSpec`: the one description of how a tensor is quantized, shared by train/ and lower/."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GRANULARITIES = ("tensor", "channel")
ROUNDINGS = ("half_up",)
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: Any) -> None:
    """The one bit-width rule (specs, configs, flags): an integer in MIN_BITS..MAX_BITS, else ValueError.

    >>> check_bits(4)
    >>> check_bits(4.0)
    Traceback (most recent call last):
    ...
    ValueError: must be an integer in 2..8
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"must be an integer in {MIN_BITS}..{MAX_BITS}")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is mapped to integers: r = scale * (q - zero_point).

    bits: 2..8.
    signed: integer range is signed ([-2^(b-1), 2^(b-1)-1]) or unsigned ([0, 2^b-1]).
    symmetric: zero_point fixed at 0; otherwise a learned/calibrated integer zero point.
    narrow_range: drop the most negative code, so signed ranges are symmetric
        ([-(2^(b-1)-1), 2^(b-1)-1]) as DESIGN §3 asks for weights.
    granularity: one scale per tensor or per output channel (axis 0).
    rounding: "half_up" = floor(x + 0.5). It is what the integer requantizer
        (acc * M0 + 2^(n-1)) >> n computes, so fake-quant and integer graphs agree on ties.

    >>> QuantSpec(bits=4, signed=True, narrow_range=True, granularity="channel").qrange
    (-7, 7)
    >>> QuantSpec(bits=4, signed=False).qrange
    (0, 15)
    """

    bits: int
    signed: bool
    symmetric: bool = True
    narrow_range: bool = False
    granularity: str = "tensor"
    rounding: str = "half_up"

    def __post_init__(self) -> None:
        try:
            check_bits(self.bits)
        except ValueError as e:
            raise ValueError(f"bits {e}, got {self.bits!r}") from None
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.narrow_range and not self.signed:
            raise ValueError("narrow_range only applies to signed ranges")
        if not self.symmetric and self.granularity == "channel":
            raise ValueError("per-channel quantization is symmetric only")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def qrange(self) -> tuple[int, int]:
        return self.qmin, self.qmax

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        return cls(**d)


def weight_spec(bits: int, granularity: str = "channel") -> QuantSpec:
    """Weights: signed, symmetric, narrow range, per output channel (DESIGN §3); per tensor under the
    paper's protocol (`QuantConfig.protocol == "paper"`)."""
    return QuantSpec(bits=bits, signed=True, symmetric=True, narrow_range=True, granularity=granularity)


def activation_spec(bits: int, signed: bool) -> QuantSpec:
    """Activations: per tensor, symmetric; unsigned after ReLU, signed otherwise."""
    return QuantSpec(bits=bits, signed=signed, symmetric=True, granularity="tensor")


def input_spec(bits: int = 8) -> QuantSpec:
    """The network input (normalized pixels): per tensor, unsigned with a zero point (affine)."""
    return QuantSpec(bits=bits, signed=False, symmetric=False, granularity="tensor")
