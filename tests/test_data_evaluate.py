"""Tests of train.data (evaluation data loading) and train.evaluate (top-1 and its CLI)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.errors import DFQFError
from core.paths import resolve_data_dir
from core.pixels import normalize
from toolkit import main_in_process, one_error_line
from train.data import image_batches, load_split, subset
from train.evaluate import evaluate_top1, main

REPO = Path(__file__).resolve().parents[1]
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _write_split(root: Path, n: int = 20, size: int = 16, name: str = "test.npz") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    y = (np.arange(n) % 10).astype(np.uint8)
    (root / "cifar10").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(root / "cifar10" / name, x=x, y=y)
    return x, y


def _run_cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DFQF_DATA_DIR"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "train.evaluate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


# ---- train.data -------------------------------------------------------------------------------------

def test_load_split_reads_npz(tmp_path: Path) -> None:
    x, y = _write_split(tmp_path)
    gx, gy = load_split(tmp_path, "cifar10", "test")
    assert gx.dtype == np.uint8 and gx.shape == x.shape and np.array_equal(gx, x)
    assert gy.dtype == np.int64 and np.array_equal(gy, y.astype(np.int64))


def test_load_split_lossless_file_name(tmp_path: Path) -> None:
    x, _ = _write_split(tmp_path, n=5, name="test_lossless932.npz")
    assert np.array_equal(load_split(tmp_path, "cifar10", "lossless932")[0], x)
    with pytest.raises(DFQFError, match="only for cifar10"):
        load_split(tmp_path, "cifar100", "lossless932")


def test_load_split_missing_file_names_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(DFQFError, match=r"cifar10[/\\]test\.npz"):
        load_split(tmp_path, "cifar10", "test")
    with pytest.raises(DFQFError, match="test_lossless932.npz"):
        load_split(tmp_path, "cifar10", "lossless932")


@pytest.mark.parametrize("content", [b"not a zip file at all", b""])
def test_load_split_garbage_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "test.npz").write_bytes(content)
    with pytest.raises(DFQFError, match="cannot read"):
        load_split(tmp_path, "cifar10", "test")


@pytest.mark.parametrize("x, y, match", [
    (np.zeros((4, 8, 8, 3), np.float32), np.zeros(4, np.int64), "uint8"),
    (np.zeros((4, 8, 8), np.uint8), np.zeros(4, np.int64), "uint8"),
    (np.zeros((4, 8, 8, 3), np.uint8), np.zeros(3, np.int64), "labels"),
    (np.zeros((4, 8, 8, 3), np.uint8), np.full(4, 10, np.int64), "0..9"),
    (np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, np.float32), "integer"),
])
def test_load_split_rejects_bad_arrays(tmp_path: Path, x: np.ndarray, y: np.ndarray, match: str) -> None:
    (tmp_path / "cifar10").mkdir()
    np.savez(tmp_path / "cifar10" / "test.npz", x=x, y=y)
    with pytest.raises(DFQFError, match=match):
        load_split(tmp_path, "cifar10", "test")


def test_load_split_missing_key(tmp_path: Path) -> None:
    (tmp_path / "cifar10").mkdir()
    np.savez(tmp_path / "cifar10" / "test.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DFQFError, match="lacks"):
        load_split(tmp_path, "cifar10", "test")


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DFQF_DATA_DIR", raising=False)
    with pytest.raises(DFQFError, match="--data-dir or set DFQF_DATA_DIR"):
        resolve_data_dir(None)
    with pytest.raises(DFQFError, match="not found"):
        resolve_data_dir(tmp_path / "absent")
    assert resolve_data_dir(tmp_path) == tmp_path
    monkeypatch.setenv("DFQF_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path


def test_normalize_matches_numpy() -> None:
    x = np.random.default_rng(1).integers(0, 256, size=(3, 5, 7, 3), dtype=np.uint8)
    expected = ((x / 255.0 - np.array(MEAN)) / np.array(STD)).transpose(0, 3, 1, 2)
    for given in (x, torch.from_numpy(x)):
        got = normalize(given, MEAN, STD)
        assert got.dtype == torch.float32 and got.shape == (3, 3, 5, 7)
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)


def test_image_batches_cover_all_rows() -> None:
    x = np.zeros((10, 4, 4, 3), np.uint8)
    y = np.arange(10)
    batches = list(image_batches(x, y, MEAN, STD, 4))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert all(b[0].shape[1:] == (3, 4, 4) and b[1].dtype == torch.int64 for b in batches)
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.arange(10))


def test_subset_is_seeded_and_spans_classes() -> None:
    x = np.arange(1000).reshape(1000, 1, 1, 1).repeat(3, axis=3).astype(np.uint8)
    y = np.repeat(np.arange(10), 100)
    a = subset(x, y, 50, seed=3)
    b = subset(x, y, 50, seed=3)
    assert np.array_equal(a[1], b[1]) and len(a[1]) == 50
    assert len(np.unique(a[1])) > 5  # the first 50 rows would all be class 0
    assert subset(x, y, 5000, seed=0)[1] is y


# ---- train.evaluate ---------------------------------------------------------------------------------

class OneHot(nn.Module):
    """Predicts the label stored in each image's first pixel (channel 0), or a fixed class."""

    def __init__(self, num_classes: int = 10, fixed: int | None = None) -> None:
        super().__init__()
        self.num_classes, self.fixed = num_classes, fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels = torch.full((x.shape[0],), self.fixed) if self.fixed is not None else x[:, 0, 0, 0].long()
        return nn.functional.one_hot(labels, self.num_classes).float()


def test_evaluate_top1_known_answers() -> None:
    y = torch.arange(10).repeat(3)  # 30 labels, 3 per class
    images = y.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    batches = [(images[i:i + 7], y[i:i + 7]) for i in range(0, 30, 7)]
    assert evaluate_top1(OneHot(), batches) == (100.0, 30)
    top1, n = evaluate_top1(OneHot(fixed=4), batches)
    assert n == 30 and top1 == pytest.approx(10.0)


def test_evaluate_top1_restores_mode_and_rejects_empty() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10)).train()
    evaluate_top1(model, [(torch.zeros(2, 3, 2, 2), torch.zeros(2, dtype=torch.int64))])
    assert model.training
    with pytest.raises(DFQFError, match="no images"):
        evaluate_top1(model, [])


def test_cli_tinynet_on_synthetic_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_split(tmp_path, n=20, size=16)
    assert main(["--arch", "tinynet", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                 "--batch-size", "8", "--limit", "15"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 15 and 0.0 <= result["top1"] <= 100.0
    assert result["arch"] == "tinynet" and result["split"] == "test" and result["weights"] is None
    assert isinstance(result["seconds"], float)


def test_cli_in_process_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--arch", "tinynet", "--data-dir", str(tmp_path)]) == 2
    assert "tinynet has no evaluation data set" in capsys.readouterr().err
    _write_split(tmp_path, n=4, size=32)  # 32x32 images do not fit tinynet's 16x16 input
    assert main(["--arch", "tinynet", "--dataset", "cifar10", "--data-dir", str(tmp_path)]) == 2
    assert "expects 16x16" in capsys.readouterr().err


def _assert_one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    return lines[0]


def test_cli_bad_arch_exits_2() -> None:
    line = _assert_one_error_line(_run_cli("--arch", "nope"))
    assert "nope" in line and "resnet20" in line


def test_cli_missing_data_dir_exits_2(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DFQF_DATA_DIR", raising=False)
    line = one_error_line(*main_in_process("train.evaluate", ["--arch", "resnet20", "--data-dir", tmp_path / "absent"],
                                           capsys))
    assert "absent" in line
    assert "DFQF_DATA_DIR" in one_error_line(*main_in_process("train.evaluate", ["--arch", "resnet20"], capsys))


def test_cli_bad_flag_is_usage_error() -> None:
    proc = _run_cli("--arch", "resnet20", "--split", "validation")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_benchmark_teacher_lossless932(shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = shared_data / "teachers" / "resnet20_cifar10.pt"
    assert main(["--arch", "resnet20", "--weights", str(weights), "--data-dir", str(shared_data),
                 "--split", "lossless932"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 932
    assert result["top1"] == 91.63  # README: exact original pixels of the first 932 official test images
