"""Quantization math (train/quant/spec.py, train/quant/primitives.py) against independent references.

References here use NumPy int64 / Python ints and the documented rounding floor(x + 0.5), evaluated
exactly (in float64 on float32 quotients, or with fractions.Fraction) — never the library itself.
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from toolkit import frac_round_half_up
from train.quant import primitives as P
from train.quant.spec import QuantSpec, activation_spec, input_spec, weight_spec

SETTINGS = settings(deadline=None, max_examples=60)
BITS = st.integers(2, 8)



# ---------------------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------------------
def ref_qrange(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    n = 1 << bits  # number of codes
    if not signed:
        return 0, n - 1
    lo, hi = -(n // 2), n // 2 - 1
    return (lo + 1 if narrow else lo), hi


def ref_shape(p: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    p = np.asarray(p)
    if p.ndim == 0:
        return p
    shape = [1] * ndim
    shape[axis] = -1
    return p.reshape(shape)


def ref_quantize(x, s, z, qmin: int, qmax: int, axis: int = 0) -> np.ndarray:
    """int64 reference: the float32 quotient x/s, then exact floor(v + 0.5), + z, clamp."""
    x = np.asarray(x, dtype=np.float32)
    v = x / ref_shape(np.asarray(s, dtype=np.float32), x.ndim, axis)  # float32 / float32, as torch does
    r = np.floor(v.astype(np.float64) + 0.5).astype(np.int64)  # exact for float32 inputs
    q = r + ref_shape(np.asarray(z, dtype=np.int64), x.ndim, axis)
    return np.clip(q, qmin, qmax)


def ref_dequantize(q, s, z, axis: int = 0) -> np.ndarray:
    q = np.asarray(q, dtype=np.int64)
    k = (q - ref_shape(np.asarray(z, dtype=np.int64), q.ndim, axis)).astype(np.float32)  # small ints: exact
    return ref_shape(np.asarray(s, dtype=np.float32), q.ndim, axis) * k


# ---------------------------------------------------------------------------------------------------
# QuantSpec
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
def test_qrange_all_bit_widths(bits: int) -> None:
    for signed, narrow in [(True, False), (True, True), (False, False)]:
        spec = QuantSpec(bits=bits, signed=signed, narrow_range=narrow)
        assert spec.qrange == ref_qrange(bits, signed, narrow)
        assert (spec.qmin, spec.qmax) == spec.qrange
    # narrow signed ranges are symmetric, full signed ranges have one extra negative code
    assert QuantSpec(bits=bits, signed=True, narrow_range=True).qmin == -QuantSpec(bits=bits, signed=True).qmax
    assert QuantSpec(bits=bits, signed=False).qmax - QuantSpec(bits=bits, signed=False).qmin + 1 == 2**bits


@pytest.mark.parametrize("kwargs", [
    dict(bits=1, signed=True),
    dict(bits=9, signed=True),
    dict(bits=0, signed=False),
    dict(bits=16, signed=False),
    dict(bits=4.0, signed=True),
    dict(bits="8", signed=True),
    dict(bits=4, signed=True, granularity="row"),
    dict(bits=4, signed=True, granularity="Tensor"),
    dict(bits=4, signed=False, narrow_range=True),
    dict(bits=4, signed=True, rounding="half_even"),
    dict(bits=4, signed=True, symmetric=False, granularity="channel"),
])
def test_invalid_spec_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        QuantSpec(**kwargs)


@given(bits=BITS, signed=st.booleans(), symmetric=st.booleans(), narrow=st.booleans(), channel=st.booleans())
@SETTINGS
def test_spec_dict_round_trip(bits: int, signed: bool, symmetric: bool, narrow: bool, channel: bool) -> None:
    assume(signed or not narrow)
    assume(symmetric or not channel)
    spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow,
                     granularity="channel" if channel else "tensor")
    d = spec.to_dict()
    assert type(d) is dict
    assert all(type(v) in (int, bool, str) for v in d.values())
    assert d["bits"] == bits and d["signed"] is signed and d["symmetric"] is symmetric
    back = QuantSpec.from_dict(dict(d))
    assert back == spec and hash(back) == hash(spec) and back.qrange == spec.qrange


def test_spec_is_frozen() -> None:
    spec = QuantSpec(bits=4, signed=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 8  # type: ignore[misc]
    assert spec.bits == 4


def test_spec_helpers_follow_design() -> None:
    w = weight_spec(4)
    assert (w.signed, w.symmetric, w.narrow_range, w.granularity, w.qrange) == (True, True, True, "channel", (-7, 7))
    a = activation_spec(3, signed=False)
    assert (a.granularity, a.symmetric, a.qrange) == ("tensor", True, (0, 7))
    i = input_spec()
    assert (i.bits, i.signed, i.symmetric, i.granularity) == (8, False, False, "tensor")


# ---------------------------------------------------------------------------------------------------
# quantize / dequantize / fake_quantize
# ---------------------------------------------------------------------------------------------------
def spec_strategy(channel: bool):
    @st.composite
    def build(draw):
        bits, signed = draw(BITS), draw(st.booleans())
        narrow = signed and draw(st.booleans())
        symmetric = True if channel else draw(st.booleans())
        return QuantSpec(bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow,
                         granularity="channel" if channel else "tensor")
    return build()


@st.composite
def quant_case(draw, channel: bool | None = None):
    """(x, scale, zero_point, spec, axis) with float32 x of a random shape."""
    channel = draw(st.booleans()) if channel is None else channel
    spec = draw(spec_strategy(channel))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1e4, 1e4, width=32)))
    scales = st.floats(2.0**-10, 1e2, width=32)
    if channel:
        s = np.array(draw(st.lists(scales, min_size=shape[0], max_size=shape[0])), dtype=np.float32)
        z = np.zeros(shape[0], dtype=np.int64)
    else:
        s = np.float32(draw(scales))
        z = np.int64(0 if spec.symmetric else draw(st.integers(spec.qmin, spec.qmax)))
    return x, s, z, spec, 0


def as_torch(x, s, z):
    return torch.from_numpy(np.array(x, dtype=np.float32)), torch.tensor(s, dtype=torch.float32), \
        torch.tensor(z, dtype=torch.int32)


@given(case=quant_case())
@SETTINGS
def test_quantize_matches_numpy_reference(case) -> None:
    x, s, z, spec, axis = case
    q = P.quantize(*as_torch(x, s, z), spec, axis=axis)
    assert q.dtype == torch.int32 and tuple(q.shape) == x.shape
    np.testing.assert_array_equal(q.numpy().astype(np.int64), ref_quantize(x, s, z, spec.qmin, spec.qmax, axis))


@given(case=quant_case())
@SETTINGS
def test_dequantize_matches_numpy_reference(case) -> None:
    x, s, z, spec, axis = case
    q = ref_quantize(x, s, z, spec.qmin, spec.qmax, axis)
    r = P.dequantize(torch.from_numpy(q.astype(np.int32)), torch.tensor(s), torch.tensor(z, dtype=torch.int32),
                     axis=axis)
    assert r.dtype == torch.float32
    np.testing.assert_array_equal(r.numpy(), ref_dequantize(q, s, z, axis))


@given(case=quant_case(), data=st.data())
@SETTINGS
def test_grid_values_round_trip(case, data) -> None:
    """Values already on the grid: quantize(dequantize(q)) == q exactly, for every code in the range."""
    x, s, z, spec, axis = case
    codes = data.draw(hnp.arrays(np.int64, x.shape, elements=st.integers(spec.qmin, spec.qmax)))
    codes.flat[0] = spec.qmin
    codes.flat[-1] = spec.qmax
    st_, zt = torch.tensor(s), torch.tensor(z, dtype=torch.int32)
    r = P.dequantize(torch.from_numpy(codes), st_, zt, axis=axis)
    q = P.quantize(r, st_, zt, spec, axis=axis)
    np.testing.assert_array_equal(q.numpy().astype(np.int64), codes)
    # and fake-quant leaves grid values unchanged
    assert torch.equal(P.fake_quantize(r, st_, zt, spec, axis=axis), r)


@given(case=quant_case())
@SETTINGS
def test_fake_quantize_equals_dequantize_of_quantize_symmetric(case) -> None:
    x, s, z, spec, axis = case
    assume(spec.symmetric)
    xt, st_, zt = as_torch(x, s, z)
    fq = P.fake_quantize(xt, st_, zt, spec, axis=axis)
    assert torch.equal(fq, P.dequantize(P.quantize(xt, st_, zt, spec, axis=axis), st_, zt, axis=axis))


@given(spec=spec_strategy(channel=False), s=st.floats(2.0**-10, 1e2, width=32), data=st.data())
@SETTINGS
def test_fake_quantize_equals_dequantize_of_quantize_affine(spec, s, data) -> None:
    """Affine (zero point != 0): inputs a safe distance (>= 0.05 LSB) away from rounding ties."""
    z = data.draw(st.integers(spec.qmin, spec.qmax)) if not spec.symmetric else 0
    n = data.draw(st.integers(1, 40))
    k = np.array(data.draw(st.lists(st.integers(spec.qmin - z - 3, spec.qmax - z + 3), min_size=n, max_size=n)))
    d = np.array(data.draw(st.lists(st.floats(-0.45, 0.45), min_size=n, max_size=n)))
    x = ((k + d) * np.float64(s)).astype(np.float32)
    xt, st_, zt = as_torch(x, np.float32(s), np.int64(z))
    q = P.quantize(xt, st_, zt, spec)
    np.testing.assert_array_equal(q.numpy(), np.clip(k + z, spec.qmin, spec.qmax))
    assert torch.equal(P.fake_quantize(xt, st_, zt, spec), P.dequantize(q, st_, zt))


def test_fake_quantize_equals_dequantize_of_quantize_near_ties_affine() -> None:
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    s, z = torch.tensor(1.0), torch.tensor(64, dtype=torch.int32)
    x = torch.tensor([0.4999999, 1.4999999, -0.5000001])  # x/s just below / above a tie
    assert P.quantize(x, s, z, spec).tolist() == [64, 65, 63]  # floor(x/s + 0.5) + 64
    assert torch.equal(P.fake_quantize(x, s, z, spec), P.dequantize(P.quantize(x, s, z, spec), s, z))


def test_fake_quantize_forward_independent_of_grad_factor() -> None:
    g = torch.Generator().manual_seed(0)
    spec = weight_spec(4)
    x = torch.randn(64, 50, generator=g)
    s = torch.rand(64, generator=g) * 0.3 + 0.01
    z = torch.zeros(64, dtype=torch.int32)
    want = P.dequantize(P.quantize(x, s, z, spec), s, z)
    for factor in [1.0, P.lsq_grad_factor(50, spec.qmax), 0.3]:
        assert torch.equal(P.fake_quantize(x, s, z, spec, grad_factor=factor), want), factor


@pytest.mark.parametrize("signed", [True, False])
def test_ties_round_up(signed: bool) -> None:
    spec = QuantSpec(bits=8, signed=signed)
    s = torch.tensor(0.25)  # power of two: x / s is exact
    k = torch.arange(-6, 6, dtype=torch.float32)
    x = (k + 0.5) * s  # x / s = k + 0.5 exactly
    want = np.clip(np.arange(-6, 6) + 1, spec.qmin, spec.qmax)  # half up, also for negatives: -0.5 -> 0
    q = P.quantize(x, s, torch.tensor(0), spec)
    np.testing.assert_array_equal(q.numpy(), want)
    assert torch.equal(P.fake_quantize(x, s, torch.tensor(0), spec), torch.from_numpy(want).float() * s)
    assert P.round_half_up(torch.tensor([-2.5, -0.5, 0.5, 2.5])).tolist() == [-2.0, 0.0, 1.0, 3.0]


def test_round_half_up_exact_for_float32_edge_values() -> None:
    x = torch.tensor([0.49999997, 8388609.0, -8388609.0, 0.5, -0.5], dtype=torch.float32)
    want = [frac_round_half_up(Fraction(v)) for v in x.tolist()]
    assert P.round_half_up(x).tolist() == want


# ---------------------------------------------------------------------------------------------------
# choose_qparams
# ---------------------------------------------------------------------------------------------------
RANGE = st.floats(-1e3, 1e3, width=32)


@given(lo=RANGE, hi=RANGE, bits=BITS, signed=st.booleans(), narrow=st.booleans())
@SETTINGS
def test_choose_qparams_symmetric(lo: float, hi: float, bits: int, signed: bool, narrow: bool) -> None:
    lo, hi = min(lo, hi), max(lo, hi)
    spec = QuantSpec(bits=bits, signed=signed, narrow_range=narrow and signed)
    s, z = P.choose_qparams(torch.tensor(lo), torch.tensor(hi), spec)
    assert int(z) == 0 and float(s) > 0
    amax = max(-lo, hi, 0.0) if signed else max(hi, 0.0)
    if amax > 1e-6:
        assert float(s) == pytest.approx(amax / spec.qmax, rel=1e-6)
        # the covered range [qmin*s, qmax*s] contains [lo, hi] (and 0), up to float rounding
        assert spec.qmax * float(s) >= amax * (1 - 1e-6)
        if signed:
            assert spec.qmin * float(s) <= min(lo, 0.0) * (1 - 1e-6)
    # zero is exactly representable
    assert P.quantize(torch.tensor(0.0), s, z, spec).item() == 0


@given(lo=RANGE, hi=RANGE, bits=BITS)
@SETTINGS
def test_choose_qparams_affine(lo: float, hi: float, bits: int) -> None:
    lo, hi = min(lo, hi), max(lo, hi)
    spec = QuantSpec(bits=bits, signed=False, symmetric=False)
    s, z = P.choose_qparams(torch.tensor(lo), torch.tensor(hi), spec)
    zp = int(z)
    assert spec.qmin <= zp <= spec.qmax and float(s) > 0
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)  # the range always contains 0
    # 0 maps exactly to the zero point and back to 0
    assert P.quantize(torch.tensor(0.0), s, z, spec).item() == zp
    assert P.dequantize(torch.tensor(zp), s, z).item() == 0.0
    if hi0 - lo0 > 1e-3:
        assert float(s) == pytest.approx((hi0 - lo0) / (spec.qmax - spec.qmin), rel=1e-5)
        qlo = P.quantize(torch.tensor(lo0), s, z, spec).item()
        qhi = P.quantize(torch.tensor(hi0), s, z, spec).item()
        assert abs(qlo - spec.qmin) <= 1 and abs(qhi - spec.qmax) <= 1  # min -> ~qmin, max -> ~qmax
        # unclamped codes of min/max stay within one step of the range ends
        assert lo0 / float(s) + zp >= spec.qmin - 1 and hi0 / float(s) + zp <= spec.qmax + 1


def test_choose_qparams_positive_or_negative_only_ranges() -> None:
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    s, z = P.choose_qparams(torch.tensor(2.0), torch.tensor(5.0), spec)  # min clamped to 0
    assert int(z) == 0 and float(s) == pytest.approx(5.0 / 255)
    s, z = P.choose_qparams(torch.tensor(-5.0), torch.tensor(-2.0), spec)  # max clamped to 0
    assert int(z) == 255 and float(s) == pytest.approx(5.0 / 255)
    s, z = P.choose_qparams(torch.tensor(0.0), torch.tensor(0.0), QuantSpec(bits=4, signed=True))
    assert torch.isfinite(s) and float(s) > 0  # degenerate range: no division by zero


def test_choose_qparams_per_channel() -> None:
    spec = weight_spec(4)
    lo, hi = torch.tensor([-1.0, -0.5, 0.0, -3.0]), torch.tensor([0.5, 2.0, 0.7, 0.0])
    s, z = P.choose_qparams(lo, hi, spec)
    np.testing.assert_allclose(s.numpy(), np.array([1.0, 2.0, 0.7, 3.0]) / 7, rtol=1e-6)
    assert z.tolist() == [0, 0, 0, 0]


# ---------------------------------------------------------------------------------------------------
# STE / LSQ gradients
# ---------------------------------------------------------------------------------------------------
@st.composite
def grad_case(draw):
    channel = draw(st.booleans())
    spec = draw(spec_strategy(channel))
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 6)))
    c = shape[0]
    if channel:
        s = np.array(draw(st.lists(st.floats(2.0**-7, 2.0, width=32), min_size=c, max_size=c)), dtype=np.float32)
        z = 0
    else:
        s = np.float32(draw(st.floats(2.0**-7, 2.0, width=32)))
        z = 0 if spec.symmetric else draw(st.integers(spec.qmin, spec.qmax))
    # x = (k + d) * s, k an integer (some outside the range: clipped), d well away from ties. Codes equal to
    # qmin/qmax are left out here: their half-LSB bands straddle the clipping point (test below).
    codes = st.integers(spec.qmin - z - 3, spec.qmax - z + 3).filter(lambda c: c + z not in spec.qrange)
    k = draw(hnp.arrays(np.int64, shape, elements=codes))
    d = draw(hnp.arrays(np.float64, shape, elements=st.floats(-0.4, 0.4)))
    x = ((k + d) * ref_shape(s.astype(np.float64), 2, 0)).astype(np.float32)
    gy = draw(hnp.arrays(np.float32, shape, elements=st.floats(-2, 2, width=32)))
    factor = draw(st.sampled_from([1.0, 0.25, P.lsq_grad_factor(shape[1], spec.qmax)]))
    return x, s, z, spec, k, gy, factor


@given(case=grad_case())
@SETTINGS
def test_lsq_gradients(case) -> None:
    x, s, z, spec, k, gy, factor = case
    xt = torch.tensor(x, requires_grad=True)
    st_ = torch.tensor(s, requires_grad=True)
    zt = torch.tensor(z, dtype=torch.int32)
    out = P.fake_quantize(xt, st_, zt, spec, axis=0, grad_factor=factor)
    out.backward(torch.from_numpy(gy))

    s64 = ref_shape(s.astype(np.float64), 2, 0)
    code = k + z
    v = x.astype(np.float64) / s64 + z  # LSQ: clip test on the real-valued x/s + z
    inside = (v >= spec.qmin) & (v <= spec.qmax)
    dx = np.where(inside, gy, 0.0)
    local = np.where(inside, k - x.astype(np.float64) / s64, np.where(code < spec.qmin, spec.qmin - z, spec.qmax - z))
    ds = factor * (gy.astype(np.float64) * local)
    ds = ds.sum(axis=1) if s.ndim == 1 else ds.sum()
    # float32 rounding in autograd is relative to the terms summed, not to their (cancelling) sum
    mag = factor * np.abs(gy) * (np.abs(k) + abs(z) + 1.0)
    mag = mag.sum(axis=1) if s.ndim == 1 else mag.sum()

    np.testing.assert_allclose(xt.grad.numpy(), dx, rtol=1e-5, atol=1e-7)
    assert np.all(xt.grad.numpy()[~inside] == 0)
    assert np.all(np.abs(st_.grad.numpy() - ds) <= 1e-5 * mag + 1e-7)


@pytest.mark.parametrize("signed", [True, False])
def test_lsq_gradient_half_lsb_next_to_range_ends(signed: bool) -> None:
    """x/s + z = qmin + 0.2 and qmax - 0.2 are inside the clipping range, qmin - 0.2 and qmax + 0.2 outside."""
    spec = QuantSpec(bits=4, signed=signed)
    qmin, qmax = spec.qrange
    t = np.array([qmin + 0.2, qmax - 0.2, qmin - 0.2, qmax + 0.2])
    s = 0.5
    x = torch.tensor(t * s, dtype=torch.float32, requires_grad=True)
    st_ = torch.tensor(s, requires_grad=True)
    P.fake_quantize(x, st_, torch.tensor(0), spec).backward(torch.ones(4))
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]
    want_ds = (qmin - (qmin + 0.2)) + (qmax - (qmax - 0.2)) + qmin + qmax
    assert st_.grad.item() == pytest.approx(want_ds, abs=1e-5)


def test_lsq_gradient_small_example_by_hand() -> None:
    """4-bit signed, s = 0.5: x/s = [0.6, -9, 9, 3.2]; codes [1, -8(clipped), 7(clipped), 3]."""
    spec = QuantSpec(bits=4, signed=True)
    x = torch.tensor([0.3, -4.5, 4.5, 1.6], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    P.fake_quantize(x, s, torch.tensor(0), spec).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 0.0, 1.0]
    # (1 - 0.6) + (-8) + 7 + (3 - 3.2)
    assert s.grad.item() == pytest.approx(0.4 - 8 + 7 - 0.2, abs=1e-5)
