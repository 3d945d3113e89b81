"""Generator shapes and pixel contract; DFQF losses against NumPy formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from core.pixels import normalize
from train.generator import Generator, to_uint8
from train.losses import (
    BNStatsHook,
    GeneratorLossWeights,
    adversarial_loss,
    entropy,
    generator_loss,
    inception_score_loss,
    kd_loss,
)
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


@pytest.mark.parametrize("size, init, stages", [(16, 4, 2), (32, 4, 3), (224, 7, 5)])
def test_generator_starts_at_4_or_7_and_doubles(size: int, init: int, stages: int) -> None:
    g = Generator(10, (3, size, size), CIFAR_MEAN, CIFAR_STD, latent_dim=8, base_channels=256)
    assert g.init == init
    convs = [m for m in g.body if isinstance(m, nn.Conv2d)]
    assert sum(isinstance(m, nn.Upsample) for m in g.body) == stages and len(convs) == stages + 1
    assert [c.out_channels for c in convs[:-1]] == [max(256 >> (i + 1), 64) for i in range(stages)]  # floor: width / 4


@pytest.mark.parametrize("height, width, side", [(30, 30, 32), (24, 24, 28), (7, 7, 8), (20, 12, 28),
                                                  (336, 336, 448), (4, 64, 64)])
def test_generator_covers_any_size_and_crops_it(height: int, width: int, side: int) -> None:
    g = Generator(10, (3, height, width), CIFAR_MEAN, CIFAR_STD, latent_dim=8, base_channels=32)
    assert g.init << (sum(isinstance(m, nn.Upsample) for m in g.body)) == side  # the square it generates
    z, labels = g.sample_inputs(2)
    assert g(z, labels).shape == (2, 3, height, width)


def test_conditional_generator_requires_labels_and_unconditional_does_not() -> None:
    g = Generator(10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, latent_dim=8)
    with pytest.raises(ValueError, match="labels"):
        g.pixels(torch.randn(2, 8))
    u = Generator(10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, latent_dim=8, conditional=False)
    assert u(torch.randn(2, 8)).shape == (2, 3, 32, 32)
    assert not any(isinstance(m, nn.Embedding) for m in u.modules())


def test_generator_batch_norms_use_default_eps() -> None:
    g = Generator(10, (3, 224, 224), CIFAR_MEAN, CIFAR_STD, latent_dim=8, base_channels=32)
    bns = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-5 for m in bns)


def test_sample_inputs_are_balanced() -> None:
    g = Generator(10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, latent_dim=8)
    z, y = g.sample_inputs(50, generator=torch.Generator().manual_seed(1))
    assert z.shape == (50, 8) and y.shape == (50,) and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == [5] * 10
    assert not torch.equal(y, torch.arange(50) % 10)  # shuffled
    z2, y2 = g.sample_inputs(50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z, z2) and torch.equal(y, y2)  # seeded


def test_uint8_round_trip_is_within_half_a_level() -> None:
    pixels = torch.rand(3, 3, 8, 8)
    u8 = to_uint8(pixels)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 8, 8, 3)
    back = normalize(u8, CIFAR_MEAN, CIFAR_STD)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    ref = (pixels - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / std
    assert ((back - ref).abs() <= 0.5 / 255 / std + 1e-6).all()
    # values on the 1/255 grid survive exactly, and ties round up
    grid = (torch.arange(256, dtype=torch.float64) / 255).float().view(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(to_uint8(grid).permute(0, 3, 1, 2), torch.arange(256).view(1, 1, 16, 16).expand(1, 3, 16, 16)
                       .to(torch.uint8))
    ties = torch.tensor([0.5, 0.25, 0.75]).view(1, 3, 1, 1)  # ·255 = 127.5, 63.75, 191.25
    assert to_uint8(ties).flatten().tolist() == [128, 64, 191]
    g = Generator(10, (3, 16, 16), CIFAR_MEAN, CIFAR_STD, latent_dim=8)
    torch.testing.assert_close(normalize(to_uint8(grid), CIFAR_MEAN, CIFAR_STD), g.normalize(grid), atol=1e-6, rtol=0)


def test_entropy_and_inception_score_loss() -> None:
    p = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    ref = -(p * np.log(np.where(p > 0, p, 1))).sum(1)
    np.testing.assert_allclose(entropy(torch.tensor(p)).numpy(), ref, rtol=1e-6)
    confident_balanced = torch.eye(10) * 20
    uniform = torch.zeros(10, 10)
    confident_one_class = torch.zeros(10, 10)
    confident_one_class[:, 3] = 20
    best = inception_score_loss(confident_balanced, 40.0).item()
    assert best < inception_score_loss(uniform, 40.0).item()
    assert best < inception_score_loss(confident_one_class, 40.0).item()


def _conv_bn(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A conv+BN model whose BN running statistics equal the batch statistics of the input it sees on x."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        h = model[0](x)
        model[1].running_mean.copy_(h.mean(dim=(0, 2, 3)))
        model[1].running_var.copy_(h.var(dim=(0, 2, 3), unbiased=False))
    return model, x, h


def _numpy_bn_distance(kind: str, mu_b: np.ndarray, var_b: np.ndarray, mu: np.ndarray, var: np.ndarray,
                       eps: float) -> float:
    if kind == "mse":
        return float(((mu_b - mu) ** 2).mean() + ((var_b - var) ** 2).mean())
    if kind == "zeroq":
        return float(((mu_b - mu) ** 2).mean() + ((np.sqrt(var_b + eps) - np.sqrt(var + eps)) ** 2).mean())
    vb, v = var_b + eps, var + eps  # KL(N(mu_b, vb) || N(mu, v)) per channel
    return float((np.log(np.sqrt(v) / np.sqrt(vb)) + (vb + (mu_b - mu) ** 2) / (2 * v) - 0.5).mean())


def test_bn_stats_hook_is_zero_at_the_running_statistics() -> None:
    model, x, _ = _conv_bn()
    with BNStatsHook(model) as hook, torch.no_grad():
        for kind in ("mse", "kl", "zeroq"):
            model(x)
            assert hook.loss(kind).item() < 1e-6, kind
            model(1.5 * x + 0.5)  # other inputs, other statistics
            assert hook.loss(kind).item() > 1e-3, kind


@pytest.mark.parametrize("kind", ["mse", "kl", "zeroq"])
def test_bn_stats_hook_matches_numpy(kind: str) -> None:
    model, x, h = _conv_bn()
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.add_(torch.tensor([0.5, -0.2, 0.0, 1.0]))
        bn.running_var.mul_(torch.tensor([2.0, 0.5, 1.0, 3.0]))
    with BNStatsHook(model) as hook, torch.no_grad():
        model(x)
        assert len(hook.records) == 1
        got = hook.loss(kind).item()
        assert hook.records == []  # loss() clears
    d = torch.float64
    ref = _numpy_bn_distance(kind, h.mean(dim=(0, 2, 3)).to(d).numpy(), h.var(dim=(0, 2, 3), unbiased=False).to(d)
                             .numpy(), bn.running_mean.to(d).numpy(), bn.running_var.to(d).numpy(), bn.eps)
    assert ref > 1e-2 and got == pytest.approx(ref, rel=1e-4)


def test_bn_stats_hook_averages_layers_and_snapshots_running_stats_in_train_mode() -> None:
    teacher = TinyNet().train()  # train mode: BN updates its running stats in the same forward
    bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    with BNStatsHook(teacher) as hook, torch.no_grad():
        teacher(torch.randn(4, 3, 16, 16))
        assert len(hook.records) == len(bns) == 5
        for (_, _, mu, var, _), (mu0, var0) in zip(hook.records, before):
            assert torch.equal(mu, mu0) and torch.equal(var, var0)
        per_layer = [((mu_b - mu) ** 2).mean() + ((var_b - var) ** 2).mean()
                     for mu_b, var_b, mu, var, _ in hook.records]
        torch.testing.assert_close(hook.loss("mse"), torch.stack(per_layer).mean())


def test_bn_stats_hook_errors_and_removal() -> None:
    model, x, _ = _conv_bn()
    with pytest.raises(ValueError, match="mse.*kl.*zeroq"):
        BNStatsHook(model).loss("l2")
    with pytest.raises(ValueError, match="BatchNorm2d"):
        BNStatsHook(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    untracked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="running statistics"):
        BNStatsHook(untracked)
    with BNStatsHook(nn.Sequential(model, untracked)) as hook:
        assert len(hook.hooks) == 1  # the layer without running statistics is skipped
    with BNStatsHook(model) as hook:
        pass
    model(x)
    assert hook.records == [] and hook.hooks == []


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
    weights = GeneratorLossWeights(inception=0.0, bn=1.0, adversarial=0.0, ce=0.0)
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


def test_disabled_terms_stay_out_of_the_graph() -> None:
    torch.manual_seed(0)
    model, x, _ = _conv_bn()
    teacher = nn.Sequential(model, nn.Flatten(1), nn.LazyLinear(10))
    student_logits = torch.randn(8, 10, requires_grad=True)
    bad_labels = torch.full((8,), 99)  # cross_entropy would raise on these
    with BNStatsHook(teacher) as hook:
        t = teacher(x)
        weights = GeneratorLossWeights(inception=1.0, bn=0.0, adversarial=0.0, ce=0.0)
        loss, terms = generator_loss(weights, t, student_logits, hook, bad_labels)
        assert set(terms) == {"is", "total"} and hook.records == []  # bn skipped, but the hook is cleared
        assert terms["total"] == pytest.approx(inception_score_loss(t, weights.balance).item())
        loss.backward()
        assert student_logits.grad is None
        # the same call with the adversarial term on does reach the student logits
        teacher(x)
        weights = GeneratorLossWeights(inception=0.0, bn=0.1, adversarial=5.0, ce=0.0)
        loss, terms = generator_loss(weights, t.detach(), student_logits, hook, None)
        assert set(terms) == {"bn", "adv", "total"}
        assert terms["total"] == pytest.approx(0.1 * terms["bn"] + 5.0 * terms["adv"], rel=1e-5)
        loss.backward()
        assert student_logits.grad is not None and student_logits.grad.abs().sum() > 0
        with pytest.raises(IndexError):  # the ce term is computed when enabled
            generator_loss(GeneratorLossWeights(bn=0.0, ce=1.0), t.detach(), None, hook, bad_labels)
