"""PTQ baselines: the methods' own invariants (CLE, BN-moment propagation, ZeroQ) and train.ptq end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit import main_in_process, one_error_line
from train.baselines.dfq import bn_output_stats, correct_bias, cross_layer_equalize, equalization_pairs
from train.baselines.gaussian_stats import Gaussian, relu_moments
from train.baselines.zeroq import distill_images
from train.losses import BNStatsHook
from train.models import build_model
from train.models.tiny import TinyNet
from train.ptq import main as ptq_main
from train.quant.calibrate import calibrate_weights
from train.quant.convert import QuantConfig, quantize_model
from train.quant.fold import fold_batch_norm
from train.student import load_student

REPO = Path(__file__).resolve().parents[1]


def test_relu_moments_match_monte_carlo() -> None:
    g = torch.Generator().manual_seed(0)
    mean, std = torch.tensor([-1.0, 0.0, 0.7, 3.0]), torch.tensor([0.5, 1.0, 2.0, 0.1])
    x = torch.relu(mean + std * torch.randn(400_000, 4, generator=g))
    m = relu_moments(Gaussian(mean, std**2))
    torch.testing.assert_close(m.mean, x.mean(0), atol=4e-3, rtol=0)
    torch.testing.assert_close(m.var, x.var(0), atol=8e-3, rtol=0)


def test_cross_layer_equalization_keeps_function_and_equalizes_ranges() -> None:
    teacher = TinyNet().eval()
    folded = fold_batch_norm(teacher)
    stats = bn_output_stats(teacher)
    eq, eq_stats = cross_layer_equalize(folded, stats, iterations=1)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(eq(x), folded(x), atol=1e-4, rtol=1e-4)
    pairs = equalization_pairs(eq)
    assert pairs, "tinynet has conv -> relu -> conv pairs"
    for a_name, b_name in pairs:
        a, b = eq.get_submodule(a_name), eq.get_submodule(b_name)
        torch.testing.assert_close(a.weight.abs().amax(dim=(1, 2, 3)), b.weight.abs().amax(dim=(0, 2, 3)))
        # the BN-derived output statistics follow the rescaling of conv A
        s = folded.get_submodule(a_name).weight.abs().amax(dim=(1, 2, 3)) / a.weight.abs().amax(dim=(1, 2, 3))
        torch.testing.assert_close(eq_stats[a_name].mean * s, stats[a_name].mean, atol=1e-5, rtol=1e-4)


def test_bias_correction_removes_expected_output_shift() -> None:
    """For inputs with the mean the correction assumed, the mean output error of a 3-bit layer shrinks."""
    torch.manual_seed(0)
    student = quantize_model(TinyNet().eval(), QuantConfig(3, 8, 8))
    calibrate_weights(student)
    conv = student.get_submodule("layer1.0.conv2")
    ex = torch.rand(conv.in_channels) + 0.5
    x = ex.view(1, -1, 1, 1) + 0.1 * torch.randn(64, conv.in_channels, 8, 8)

    original_bias = conv.bias.detach().clone()

    def mean_error() -> float:
        """Per-channel mean output error against the float layer with the original bias (interior pixels:
        the correction models full 3x3 windows, not zero padding)."""
        with torch.no_grad():
            y_q = conv(x)
            y_f = torch.nn.functional.conv2d(x, conv.weight, original_bias, conv.stride, conv.padding)
        return (y_q - y_f)[:, :, 1:-1, 1:-1].mean(dim=(0, 2, 3)).abs().mean().item()

    before = mean_error()
    assert correct_bias(student, {"layer1.0.conv2": Gaussian(ex, torch.zeros_like(ex))}) == 1
    assert mean_error() < 0.2 * before


def test_zeroq_distillation_lowers_bn_statistics_loss() -> None:
    teacher = TinyNet().eval()
    noise = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    distilled = distill_images(teacher, 16, (3, 16, 16), iterations=30, lr=0.1, batch_size=16)
    loss = BNStatsHook(teacher)
    with torch.no_grad():
        teacher(noise)
        before = loss.loss("zeroq").item()
        teacher(distilled)
        after = loss.loss("zeroq").item()
    loss.remove()
    assert after < 0.5 * before
    assert all(p.requires_grad for p in teacher.parameters()), "teacher parameters are restored"


@pytest.mark.parametrize("method", ["minmax", "dfq", "zeroq"])
def test_ptq_cli_writes_a_loadable_student(method: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / method
    rc = ptq_main(["--method", method, "--arch", "tinynet", "--wbits", "8", "--abits", "8", "--out", str(out),
                   "--calib-size", "16", "--zeroq-iters", "3", "--batch-size", "16"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["data_free"] is True and report["wbits"] == 8
    student, ckpt = load_student(out / "student.pt")
    assert ckpt["method"] == method and ckpt["arch"] == "tinynet"
    teacher = TinyNet().eval()
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        agree = (student(x).argmax(1) == teacher(x).argmax(1)).float().mean().item()
    assert agree >= 0.8, f"W8A8 {method} student disagrees with its teacher on {1 - agree:.0%} of inputs"


@pytest.fixture()
def tiny_cifar(tmp_path: Path) -> tuple[Path, Path]:
    """A data dir with 64 random 32x32 CIFAR-format images per split, and random resnet20 weights."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    (data / "cifar10").mkdir(parents=True)
    for split in ("train", "test"):
        np.savez(data / "cifar10" / f"{split}.npz", x=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
                 y=rng.integers(0, 10, 64).astype(np.uint8))
    weights = tmp_path / "resnet20.pt"
    torch.save(build_model("resnet20").state_dict(), weights)
    return data, weights


def test_real_calib_uses_training_images_and_reports_accuracy(tiny_cifar, tmp_path: Path, capsys) -> None:
    data, weights = tiny_cifar
    rc = ptq_main(["--method", "real-calib", "--arch", "resnet20", "--weights", str(weights), "--wbits", "6",
                   "--abits", "6", "--out", str(tmp_path / "rc"), "--data-dir", str(data), "--calib-size", "32"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["data_free"] is False and report["calibration_images"] == 32
    assert report["eval_images"] == 64 and 0 <= report["quant_top1"] <= 100 and 0 <= report["fp_top1"] <= 100


def _run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    full_env = {**os.environ, **(env or {})}
    full_env.pop("DFQF_DATA_DIR", None)
    return subprocess.run([sys.executable, "-m", "train.ptq", *args], cwd=REPO, capture_output=True, text=True,
                          env=full_env, timeout=120)


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope", "--out", "{out}"], "invalid choice"),
    (["--method", "minmax", "--wbits", "9", "--out", "{out}"], "2..8"),
    (["--method", "minmax", "--abits", "1", "--out", "{out}"], "2..8"),
    (["--method", "minmax", "--weights", "{garbage}", "--out", "{out}"], "cannot read weights"),
    (["--method", "minmax", "--arch", "resnet56", "--weights", "{r20}", "--out", "{out}"], "missing keys"),
    (["--method", "minmax", "--weights", "{out}/none.pt", "--out", "{out}"], "not found"),
    (["--method", "real-calib", "--arch", "tinynet", "--out", "{out}"], "--data-dir"),
    (["--method", "minmax", "--arch", "tinynet", "--out", "/proc/forbidden"], "cannot write"),
    (["--method", "minmax", "--arch", "tinynet", "--data-dir", "{out}/missing", "--out", "{out}"], "not found"),
])
def test_ptq_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, tiny_cifar, tmp_path: Path, capsys,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _, r20 = tiny_cifar
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    subs = {"{out}": str(tmp_path / "out"), "{garbage}": str(garbage), "{r20}": str(r20)}
    argv = [a.replace(k, v) if isinstance(a, str) else a for a in argv for k, v in [next(
        ((k, v) for k, v in subs.items() if k in a), ("", ""))]]
    monkeypatch.delenv("DFQF_DATA_DIR", raising=False)
    assert message in one_error_line(*main_in_process("train.ptq", argv, capsys))


def test_ptq_bad_input_from_a_fresh_interpreter_is_one_line(tmp_path: Path) -> None:
    """The same contract through `python -m` (exit status and stderr of a real process)."""
    r = _run_cli("--method", "minmax", "--wbits", "9", "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "2..8" in lines[0], r.stderr
