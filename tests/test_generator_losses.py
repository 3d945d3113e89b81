"""Generator shapes and pixel contract; DFQF losses against NumPy formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from train.generator import Generator, from_uint8, to_uint8
from train.losses import (BNStatsHook, GeneratorLossWeights, adversarial_loss, entropy, generator_loss,
                          inception_score_loss, kd_loss)
from train.models.registry import CIFAR_MEAN, CIFAR_STD
from train.models.tiny import TinyNet


@pytest.mark.parametrize("size, base", [(16, 32), (32, 64), (224, 32)])
def test_generator_shapes_and_pixel_contract(size: int, base: int) -> None:
    g = Generator(10, (3, size, size), CIFAR_MEAN, CIFAR_STD, latent_dim=16, base_channels=base)
    z, y = g.sample_inputs(4, generator=torch.Generator().manual_seed(0))
    pixels = g.pixels(z, y)
    assert pixels.shape == (4, 3, size, size) and pixels.min() >= 0 and pixels.max() <= 1
    torch.testing.assert_close(g(z, y), g.normalize(pixels))
    torch.testing.assert_close(g.to_pixels(g.normalize(pixels)), pixels, atol=1e-6, rtol=0)


def test_generator_rejects_unsupported_sizes_and_missing_labels() -> None:
    with pytest.raises(ValueError):
        Generator(10, (3, 30, 30), CIFAR_MEAN, CIFAR_STD)
    g = Generator(10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, latent_dim=8)
    with pytest.raises(ValueError, match="labels"):
        g.pixels(torch.randn(2, 8))


def test_generator_batch_norms_use_default_eps() -> None:
    g = Generator(10, (3, 224, 224), CIFAR_MEAN, CIFAR_STD, latent_dim=8, base_channels=32)
    bns = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-5 for m in bns)


def test_sample_inputs_are_balanced() -> None:
    g = Generator(10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, latent_dim=8)
    _, y = g.sample_inputs(50, generator=torch.Generator().manual_seed(1))
    assert torch.bincount(y, minlength=10).tolist() == [5] * 10


def test_uint8_round_trip_is_within_half_a_level() -> None:
    pixels = torch.rand(3, 3, 8, 8)
    u8 = to_uint8(pixels)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 8, 8, 3)
    back = from_uint8(u8, CIFAR_MEAN, CIFAR_STD)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    ref = (pixels - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / std
    assert ((back - ref).abs() <= 0.5 / 255 / std + 1e-6).all()


def test_entropy_and_inception_score_loss() -> None:
    p = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    ref = -(p * np.log(np.where(p > 0, p, 1))).sum(1)
    np.testing.assert_allclose(entropy(torch.tensor(p)).numpy(), ref, rtol=1e-6)
    confident_balanced = torch.eye(10) * 20
    uniform = torch.zeros(10, 10)
    confident_one_class = torch.zeros(10, 10)
    confident_one_class[:, 3] = 20
    best = inception_score_loss(confident_balanced).item()
    assert best < inception_score_loss(uniform).item()
    assert best < inception_score_loss(confident_one_class).item()


def test_bn_stats_hook_is_zero_at_the_running_statistics_and_matches_numpy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        h = model[0](x)
        model[1].running_mean.copy_(h.mean(dim=(0, 2, 3)))
        model[1].running_var.copy_(h.var(dim=(0, 2, 3), unbiased=False))
    with BNStatsHook(model) as hook, torch.no_grad():
        for kind in ("mse", "kl", "zeroq"):
            model(x)
            assert hook.loss(kind).item() < 1e-6, kind
        model[1].running_mean.add_(0.5)
        model(x)
        got = hook.loss("kl").item()
    mu_b, var_b = h.mean(dim=(0, 2, 3)).double().numpy(), h.var(dim=(0, 2, 3), unbiased=False).double().numpy()
    mu, var = mu_b + 0.5, var_b
    eps = model[1].eps
    kl = 0.5 * np.log((var + eps) / (var_b + eps)) + (var_b + eps + (mu_b - mu) ** 2) / (2 * (var + eps)) - 0.5
    assert got == pytest.approx(kl.mean(), rel=1e-4)
    with pytest.raises(ValueError, match="mse"):
        BNStatsHook(model).loss("l2")


def test_adversarial_and_kd_losses() -> None:
    t, s = torch.randn(5, 10), torch.randn(5, 10)
    assert adversarial_loss(t, s).item() < 0 and adversarial_loss(t, t).item() == pytest.approx(0, abs=1e-6)
    assert adversarial_loss(t, s, "l1").item() == pytest.approx(-(t - s).abs().mean().item())
    assert kd_loss(t, t).item() == pytest.approx(0, abs=1e-6)
    T = 4.0
    pt = torch.softmax(t / T, 1).numpy()
    ps = torch.softmax(s / T, 1).numpy()
    ref = T * T * (pt * (np.log(pt) - np.log(ps))).sum(1).mean()
    assert kd_loss(s, t, T).item() == pytest.approx(ref, rel=1e-5)


def test_loss_weights_are_validated() -> None:
    for bad in ({"bn": -1.0}, {"adversarial": float("inf")}, {"bn_kind": "l2"}, {"adversarial_kind": "js"}):
        with pytest.raises(ValueError):
            GeneratorLossWeights(**bad)


def test_generator_loss_skips_disabled_terms_and_training_lowers_bn_term() -> None:
    torch.manual_seed(0)
    teacher = TinyNet().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    g = Generator(10, (3, 16, 16), CIFAR_MEAN, CIFAR_STD, latent_dim=16, base_channels=32)
    weights = GeneratorLossWeights(inception=0.0, bn=1.0, adversarial=0.0)
    opt = torch.optim.Adam(g.parameters(), lr=5e-3)
    history = []
    for step in range(40):
        z, y = g.sample_inputs(32, generator=torch.Generator().manual_seed(step))
        with BNStatsHook(teacher) as hook:
            loss, terms = generator_loss(weights, teacher(g(z, y)), None, hook, y)
        assert set(terms) == {"bn", "total"}  # disabled terms are not computed
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(terms["bn"])
    assert np.mean(history[-5:]) < 0.5 * np.mean(history[:5])
