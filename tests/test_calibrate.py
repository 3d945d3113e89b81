"""Range calibration (train/quant/calibrate.py): calibrated students are on the grid, and the MSE observer is
never worse than min-max."""
from __future__ import annotations

import pytest
import torch

from toolkit import batch, teacher
from train.quant import primitives as P
from train.quant.calibrate import activation_range, calibrate, calibrate_weights, weight_range
from train.quant.convert import QuantConfig, quantize_model
from train.quant.modules import ActQuantizer, QuantConv2d, QuantLinear, WeightQuantizer
from train.quant.spec import QuantSpec, activation_spec, weight_spec


# ---------------------------------------------------------------------------------------------------
# calibration: outputs on the grid
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,observer", [("tinynet", "minmax"), ("tinynet", "mse"), ("resnet20", "minmax")])
def test_calibrated_student_is_on_grid(arch: str, observer: str) -> None:
    cfg = QuantConfig(wbits=3, abits=4, first_last_bits=8)
    t = teacher(arch)
    student = quantize_model(t, cfg)
    batches = [batch(arch, 4, seed=s) for s in range(3)]
    assert calibrate(student, batches, observer=observer) == 12

    # weights: per channel on the grid, within the narrow signed range
    for name, m in student.named_modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            wq = m.weight_quantizer
            assert torch.all(wq.scale > 0)
            lim = 2 ** (wq.spec.bits - 1) - 1
            with torch.no_grad():
                codes = (wq(m.weight) / wq.scale.reshape(-1, *[1] * (m.weight.dim() - 1))).double()
            assert (codes - codes.round()).abs().max().item() < 1e-3, name
            assert codes.round().abs().max().item() <= lim, name
            if observer == "minmax":  # the largest weight of each channel maps to the largest code
                per_ch = codes.round().abs().reshape(codes.shape[0], -1).amax(dim=1)
                assert torch.all(per_ch == lim), name

    # activations: at most 2^bits values, each on the grid within qrange (inputs a bit wider than calibration)
    outputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod_, args, out, name=name: outputs.__setitem__(name, out.detach()))
             for name, m in student.named_modules() if isinstance(m, ActQuantizer)]
    try:
        with torch.no_grad():
            y = student(1.5 * batch(arch, 4, seed=99))
    finally:
        for h in hooks:
            h.remove()
    assert torch.isfinite(y).all()
    qs = dict((n, m) for n, m in student.named_modules() if isinstance(m, ActQuantizer))
    assert outputs.keys() == qs.keys()
    for name, out in outputs.items():
        q = qs[name]
        assert out.unique().numel() <= 2 ** q.spec.bits, name
        codes = out.double() / q.scale.double() + q.zero_point.double()
        assert (codes - codes.round()).abs().max().item() < 1e-3, name
        assert codes.round().min().item() >= q.spec.qmin and codes.round().max().item() <= q.spec.qmax, name
    # something is really quantized: 4-bit activations take few values
    assert any(outputs[n].unique().numel() > 2 for n in outputs)


def test_calibration_needs_a_batch_and_known_observer() -> None:
    student = quantize_model(teacher("tinynet"), QuantConfig())
    with pytest.raises(ValueError):
        calibrate(student, [])
    with pytest.raises(ValueError):
        calibrate(student, [batch("tinynet", 2)], observer="percentile")


def test_calibration_restores_enabled_flags_and_mode() -> None:
    student = quantize_model(teacher("tinynet"), QuantConfig()).train()
    calibrate(student, [batch("tinynet", 2)])
    assert student.training
    assert all(q.enabled for q in student.modules() if isinstance(q, (ActQuantizer, WeightQuantizer)))


# ---------------------------------------------------------------------------------------------------
# observers: mse never worse than minmax
# ---------------------------------------------------------------------------------------------------
def weight_mse(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-channel mean squared fake-quant error, computed channel by channel (double for the comparison)."""
    errs = []
    for c in range(w.shape[0]):
        s, z = P.choose_qparams(lo[c], hi[c], spec)
        wc = w[c].reshape(-1)
        errs.append(((P.fake_quantize(wc, s, z, spec) - wc).double() ** 2).mean())
    return torch.stack(errs)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dist", ["normal", "laplace", "uniform"])
def test_mse_observer_never_worse_than_minmax(bits: int, dist: str) -> None:
    g = torch.Generator().manual_seed(bits)
    shape = (12, 4, 3, 3)
    if dist == "normal":
        w = torch.randn(shape, generator=g)
    elif dist == "uniform":
        w = torch.rand(shape, generator=g) * 2 - 1
    else:
        u = torch.rand(shape, generator=g) - 0.5
        w = -torch.sign(u) * torch.log1p(-2 * u.abs())
    spec = weight_spec(bits)
    e_minmax = weight_mse(w, *weight_range(w, spec, "minmax"), spec)
    e_mse = weight_mse(w, *weight_range(w, spec, "mse"), spec)
    assert torch.all(e_mse <= e_minmax * (1 + 1e-6) + 1e-12)
    assert e_mse.sum() <= e_minmax.sum() * (1 + 1e-6)
    if dist == "laplace" and bits <= 4:  # heavy tails at low precision: clipping must help
        assert e_mse.sum() < 0.95 * e_minmax.sum()


@pytest.mark.parametrize("signed", [True, False])
def test_mse_activation_observer_never_worse_than_minmax(signed: bool) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4096, generator=g) ** 3  # heavy-tailed
    if not signed:
        x = x.abs()
    spec = activation_spec(4, signed=signed)
    lo, hi = x.min(), x.max()

    def err(a, b):
        s, z = P.choose_qparams(a, b, spec)
        return ((P.fake_quantize(x, s, z, spec) - x).double() ** 2).mean().item()

    e_minmax = err(*activation_range(x, lo, hi, spec, "minmax"))
    e_mse = err(*activation_range(x, lo, hi, spec, "mse"))
    assert e_mse <= e_minmax * (1 + 1e-6)
    assert e_mse < 0.9 * e_minmax


def test_mse_weight_calibration_on_student() -> None:
    t = teacher("tinynet")
    a, b = quantize_model(t, QuantConfig(wbits=3)), quantize_model(t, QuantConfig(wbits=3))
    calibrate_weights(a, "minmax")
    calibrate_weights(b, "mse")
    total_a = total_b = 0.0
    for (name, ma), mb in zip(a.named_modules(), b.modules()):
        if isinstance(ma, (QuantConv2d, QuantLinear)):
            with torch.no_grad():
                ea = ((ma.weight_quantizer(ma.weight) - ma.weight) ** 2).sum().item()
                eb = ((mb.weight_quantizer(mb.weight) - mb.weight) ** 2).sum().item()
            assert eb <= ea * (1 + 1e-5) + 1e-12, name
            total_a, total_b = total_a + ea, total_b + eb
    assert total_b < total_a
