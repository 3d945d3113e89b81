"""Dyadic multipliers and the integer requantizer (train/quant/primitives.py) against exact references:
Python big ints and fractions.Fraction, never the library itself."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from toolkit import frac_round_half_up
from train.quant import primitives as P
from train.quant.spec import QuantSpec

BITS = st.integers(2, 8)


def ref_requantize(acc: int, m0: int, n: int, zp: int, qmin: int, qmax: int) -> int:
    rounding = (1 << (n - 1)) if n > 0 else 0
    return min(max(zp + ((acc * m0 + rounding) >> n), qmin), qmax)


# ---------------------------------------------------------------------------------------------------
# dyadic multipliers and integer requantization
# ---------------------------------------------------------------------------------------------------
@given(m=st.floats(1e-9, 100.0))
@settings(deadline=None, max_examples=200)
def test_dyadic_multiplier_precision(m: float) -> None:
    m0, n = P.dyadic_multiplier(m)
    m0, n = int(m0), int(n)
    assert 2**30 <= m0 < 2**31
    assert 0 <= n <= 62
    err = abs(Fraction(m0, 2**n) - Fraction(m)) / Fraction(m)
    assert err <= Fraction(1, 2**31)


def test_dyadic_multiplier_arrays_and_exact_powers() -> None:
    m = np.array([[0.5, 0.25], [1.0, 3.0]])
    m0, n = P.dyadic_multiplier(m)
    assert m0.shape == m.shape and n.shape == m.shape
    assert m0.dtype == np.int64 and n.dtype == np.int64
    for mi, a, b in zip(m.flat, m0.flat, n.flat):
        assert Fraction(int(a), 2 ** int(b)) == Fraction(mi)  # exact for dyadic inputs
    # a multiplier whose mantissa rounds up to 2^31 carries into the exponent
    m0, n = P.dyadic_multiplier(1 - 2.0**-40)
    assert int(m0) == 2**30 and int(n) == 30


@pytest.mark.parametrize("bad", [0.0, -1.0, -1e-9, float("nan"), float("inf"), -float("inf"), 2.0**31])
def test_dyadic_multiplier_rejects(bad: float) -> None:
    with pytest.raises(ValueError):
        P.dyadic_multiplier(bad)
    with pytest.raises(ValueError):
        P.dyadic_multiplier(np.array([0.5, bad]))


def rq(acc, m0, n, zp: int, qmin: int, qmax: int, axis: int = 0) -> np.ndarray:
    """One-term `P.requantize` (no input zero point, no offset), multiplier/shift per channel or scalar."""
    return P.requantize([np.asarray(acc, np.int64)], np.reshape(np.asarray(m0, np.int64), (1, -1)),
                        np.reshape(np.asarray(n, np.int64), -1), np.zeros(np.size(n), np.int64), [0], zp, qmin, qmax,
                        axis=axis)


INT32 = st.integers(-(2**31), 2**31 - 1)
M0 = st.integers(0, 2**31 - 1)
SHIFT = st.integers(0, 62)


@st.composite
def out_range(draw):
    bits, signed = draw(BITS), draw(st.booleans())
    spec = QuantSpec(bits=bits, signed=signed)
    zp = 0 if signed else draw(st.integers(spec.qmin, spec.qmax))
    return zp, spec.qmin, spec.qmax


@given(acc=st.lists(INT32, min_size=1, max_size=30), m0=M0, n=SHIFT, rng=out_range())
@settings(deadline=None, max_examples=150)
def test_requantize_per_tensor(acc: list[int], m0: int, n: int, rng) -> None:
    zp, qmin, qmax = rng
    got = rq(acc, m0, n, zp, qmin, qmax)
    assert got.dtype == np.int64
    assert got.tolist() == [ref_requantize(a, m0, n, zp, qmin, qmax) for a in acc]


@given(acc=st.lists(INT32, min_size=1, max_size=30), m0=M0, n=SHIFT)
@settings(deadline=None, max_examples=150)
def test_requantize_is_round_half_up_of_exact_product(acc: list[int], m0: int, n: int) -> None:
    big = 2**62  # no clamping: the raw rounding
    got = rq(acc, m0, n, 0, -big, big)
    assert got.tolist() == [frac_round_half_up(Fraction(a * m0, 2**n)) for a in acc]


@given(data=st.data(), rng=out_range())
@settings(deadline=None, max_examples=80)
def test_requantize_per_channel_nchw(data, rng) -> None:
    zp, qmin, qmax = rng
    shape = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3)),
             data.draw(st.integers(1, 3)))
    c = shape[1]
    acc = data.draw(hnp.arrays(np.int64, shape, elements=INT32))
    m0 = data.draw(st.lists(M0, min_size=c, max_size=c))
    n = data.draw(st.lists(SHIFT, min_size=c, max_size=c))
    got = rq(acc.astype(np.int32), m0, n, zp, qmin, qmax, axis=1)
    want = np.empty(shape, dtype=np.int64)
    for idx in np.ndindex(*shape):
        ch = idx[1]
        want[idx] = ref_requantize(int(acc[idx]), m0[ch], n[ch], zp, qmin, qmax)
    np.testing.assert_array_equal(got, want)


def test_requantize_extreme_accumulators_do_not_overflow() -> None:
    acc = np.array([-(2**31), 2**31 - 1, -1, 0, 1])
    m0, n = 2**31 - 1, 62
    got = rq(acc, m0, n, 0, -(2**62), 2**62).tolist()
    assert got == [frac_round_half_up(Fraction(int(a) * m0, 2**n)) for a in acc.tolist()]
    got0 = rq(acc, m0, 0, 0, -(2**62), 2**62).tolist()
    assert got0 == [int(a) * m0 for a in acc.tolist()]


@given(m=st.floats(1e-6, 10.0), acc=st.lists(st.integers(-(2**20), 2**20), min_size=1, max_size=20))
@settings(deadline=None, max_examples=60)
def test_dyadic_requantize_approximates_real_multiplier(m: float, acc: list[int]) -> None:
    """requantize(acc, dyadic(m)) is round-half-up of acc*m, up to the dyadic error (at most 1 LSB off)."""
    m0, n = P.dyadic_multiplier(m)
    big = 2**62
    got = rq(acc, int(m0), int(n), 0, -big, big).tolist()
    for a, g in zip(acc, got):
        exact = Fraction(a) * Fraction(m)
        assert abs(g - exact) <= Fraction(1, 2) + abs(exact) / 2**31
