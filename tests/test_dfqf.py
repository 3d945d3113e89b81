"""train.dfqf end to end on the tiny network: outputs, resume after SIGKILL, DDP with gloo, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from toolkit import main_in_process, one_error_line
from train.student import load_student

REPO = Path(__file__).resolve().parents[1]
TINY = ["--smoke", "--arch", "tinynet", "--progress", "false"]


def run_dfqf(*args: str, timeout: float = 240, module: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DFQF_DATA_DIR", None)  # DFQF never needs data; evaluation is off without a data dir
    cmd = [sys.executable, *(module or ["-m", "train.dfqf"]), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_contiguous(records: list[dict]) -> None:
    """Each stage logs steps 1..n exactly once, in order."""
    for stage in dict.fromkeys(r["stage"] for r in records):
        steps = [r["step"] for r in records if r["stage"] == stage]
        assert steps == list(range(1, len(steps) + 1)), f"{stage}: {steps}"


@pytest.mark.parametrize("schedule", ["two-stage", "alternating"])
def test_smoke_run_writes_every_output(schedule: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # the adversarial term is off by default (two-stage); exercise it here, with a wider generator
    r = run_dfqf(*TINY, "--schedule", schedule, "--w-adv", "1", "--g-width", "64", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report == json.loads((out / "report.json").read_text())
    assert report["method"] == "dfqf" and report["data_free"] and report["images_generated"] > 0
    for name in ("config.json", "generator.pt", "student.pt", "metrics.jsonl", "samples.png"):
        assert (out / name).stat().st_size > 0, name
    config = json.loads((out / "config.json").read_text())
    assert config["schedule"] == schedule and config["wbits"] == 4 and config["g_steps"] == 4  # smoke preset
    student, ckpt = load_student(out / "student.pt")
    assert ckpt["method"] == "dfqf" and ckpt["quant_config"]["wbits"] == 4
    generator = torch.load(out / "generator.pt", weights_only=True)
    assert generator["base_channels"] == 64 and generator["state_dict"]["body.0.weight"].shape == (64,)
    records = metrics(out)
    assert_contiguous(records)
    if schedule == "two-stage":
        assert [r["stage"] for r in records].count("generator") == 4
        assert {"is", "bn", "adv", "ce", "total"} <= set(records[0])
        assert "kd" in records[-1]
        synthetic = torch.load(out / "synthetic.pt", weights_only=True)
        assert synthetic["images"].dtype == torch.uint8 and len(synthetic["images"]) == 64
    else:
        assert {"g_total", "g_adv", "kd"} <= set(records[-1])


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path) -> None:
    # the EMA of the student is part of the state a resume must restore
    args = [*TINY, "--g-steps", "150", "--s-epochs", "20", "--checkpoint-every", "3", "--s-ema", "0.1"]
    reference = tmp_path / "reference"
    assert run_dfqf(*args, "--out", str(reference)).returncode == 0

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DFQF_DATA_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "train.dfqf", *args, "--out", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoint.pt").exists() and (out / "metrics.jsonl").exists() \
                and len((out / "metrics.jsonl").read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists()

    r = run_dfqf(*args, "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed at stage" in r.stderr
    records = metrics(out)
    assert_contiguous(records)
    assert len(records) == len(metrics(reference))
    a, _ = load_student(out / "student.pt")
    b, _ = load_student(reference / "student.pt")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, atol=1e-5, rtol=1e-5, msg=f"{k} differs from the uninterrupted run")


def test_torchrun_two_cpu_processes_with_gloo(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    r = run_dfqf("--standalone", "--nproc_per_node", "2", "-m", "train.dfqf", *TINY, "--s-ema", "0.1",
                 "--out", str(out), module=["-m", "torch.distributed.run"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    assert_contiguous(metrics(out))  # only rank 0 writes
    load_student(out / "student.pt")


@pytest.mark.parametrize("argv, message", [
    (["--wbits", "9"], "2..8"),
    (["--abits", "1"], "2..8"),
    (["--schedule", "both"], "schedule"),
    (["--g-steps", "0"], "g_steps"),
    (["--no-such-flag", "1"], "unrecognized"),
    (["--out", "/proc/forbidden/run"], "cannot write"),
    (["--resume"], "holds no run"),
    (["--config", "/nonexistent.json"], "cannot read --config"),
    (["--device", "tpu9"], "--device"),
    (["--init-observer", "p99"], "--init-observer"),
    (["--w-feat", "-1"], "w_feat"),
    (["--weights", "/nonexistent.pt"], "not found"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, tmp_path: Path, capsys,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DFQF_DATA_DIR", raising=False)
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "run")]
    assert message in one_error_line(*main_in_process("train.dfqf", [*TINY, *argv], capsys))


def test_bad_input_from_a_fresh_interpreter_is_one_line(tmp_path: Path) -> None:
    """The same contract through `python -m` (exit status and stderr of a real process)."""
    r = run_dfqf(*TINY, "--wbits", "9", "--out", str(tmp_path / "run"), timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "2..8" in lines[0], r.stderr


def test_resume_with_another_config_and_overwrite_are_refused(tmp_path: Path, capsys,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DFQF_DATA_DIR", raising=False)
    out = tmp_path / "run"

    def dfqf(*args: str) -> tuple[int, str, str]:
        return main_in_process("train.dfqf", [*TINY, "--out", out, *args], capsys)

    assert dfqf()[0] == 0
    assert "already holds a run" in one_error_line(*dfqf())
    assert "differs in wbits" in one_error_line(*dfqf("--resume", "--wbits", "3"))
    # a run started before a field existed is compared at that field's default
    saved = json.loads((out / "config.json").read_text())
    del saved["g_augment"]
    (out / "config.json").write_text(json.dumps(saved))
    code, _, err = dfqf("--resume")
    assert code == 0, err[-2000:]
    assert "differs in g_augment" in one_error_line(*dfqf("--resume", "--g-augment", "true"))


def test_config_file_is_overridden_by_flags(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DFQF_DATA_DIR", raising=False)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"wbits": 5, "abits": 5, "g_steps": 2}))
    out = tmp_path / "run"
    code, _, err = main_in_process("train.dfqf", [*TINY, "--config", cfg, "--abits", "6", "--out", out], capsys)
    assert code == 0, err[-2000:]
    resolved = json.loads((out / "config.json").read_text())
    assert (resolved["wbits"], resolved["abits"], resolved["g_steps"]) == (5, 6, 2)


def test_non_finite_loss_stops_with_a_resumable_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    """A loss that turns NaN at generator step 3 stops the run (exit 2, one line) with a checkpoint."""
    import train.dfqf as D

    real = D.generator_loss
    calls = {"n": 0}

    def nan_on_third_call(*args, **kwargs):
        calls["n"] += 1
        loss, terms = real(*args, **kwargs)
        return (loss * float("nan"), terms) if calls["n"] == 3 else (loss, terms)

    monkeypatch.setattr(D, "generator_loss", nan_on_third_call)
    monkeypatch.delenv("DFQF_DATA_DIR", raising=False)
    out = tmp_path / "run"
    assert D.main([*TINY, "--checkpoint-every", "100", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: non-finite generator loss at step 2")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["stage"], ckpt["step"]) == ("generator", 2)  # the last good state


def test_flip_and_shift_gives_flipped_windows_of_the_padded_image() -> None:
    import torch.nn.functional as F

    from train.augment import flip_and_shift

    x = torch.randn(6, 3, 8, 8)
    a = flip_and_shift(x, torch.Generator().manual_seed(5), pad=2)
    b = flip_and_shift(x, torch.Generator().manual_seed(5), pad=2)
    assert torch.equal(a, b) and a.shape == x.shape
    for i in range(len(x)):
        views = [F.pad(v[None], (2, 2, 2, 2), mode="reflect")[0] for v in (x[i], x[i].flip(2))]
        windows = [p[:, dy:dy + 8, dx:dx + 8] for p in views for dy in range(5) for dx in range(5)]
        assert any(torch.equal(a[i], w) for w in windows)


def test_smoke_run_with_augmentation_and_feature_distillation(tmp_path: Path) -> None:
    r = run_dfqf(*TINY, "--s-augment", "true", "--g-augment", "true", "--w-feat", "0.5", "--out", str(tmp_path / "aug"))
    assert r.returncode == 0, r.stderr[-2000:]
    records = metrics(tmp_path / "aug")
    assert "kd" in records[-1] and records[-1]["feat"] > 0
    # --g-augment: the teacher judges shifted/flipped views, so the very first generator loss differs
    r = run_dfqf(*TINY, "--g-steps", "1", "--out", str(tmp_path / "plain"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert metrics(tmp_path / "plain")[0]["total"] != records[0]["total"]


def test_ema_decay_from_half_life_fraction() -> None:
    from train.ema import ema_decay

    assert ema_decay(0.0, 400) == 0.0
    d = ema_decay(0.05, 400)  # half-life 20 steps
    assert abs(d ** 20 - 0.5) < 1e-12
    assert ema_decay(0.05, 4000) > d  # a longer run averages over more steps


def test_ema_student_follows_the_reference_recurrence_and_is_saved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Record the student after each update; the saved student must be
    ema_0 = calibrated student, ema_k = d*ema_{k-1} + (1-d)*student_k (float64 reference),
    with d from a half-life of 0.25 of the 12 student steps (3 steps)."""
    import train.dfqf as D
    from train.ema import StudentEMA

    seen: dict[str, list] = {"reset": [], "update": []}
    real_reset, real_update = StudentEMA.reset, StudentEMA.update

    def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().double() if v.is_floating_point() else v.clone()
                for k, v in model.state_dict().items()}

    def reset(self, student):
        seen["reset"].append(snapshot(student))
        real_reset(self, student)

    def update(self, student):
        seen["update"].append(snapshot(student))
        real_update(self, student)

    monkeypatch.setattr(StudentEMA, "reset", reset)
    monkeypatch.setattr(StudentEMA, "update", update)
    monkeypatch.delenv("DFQF_DATA_DIR", raising=False)
    out = tmp_path / "run"
    assert D.main([*TINY, "--s-epochs", "3", "--s-ema", "0.25", "--out", str(out)]) == 0

    steps = 3 * 64 // 16
    assert len(seen["reset"]) == 1 and len(seen["update"]) == steps
    decay = 0.5 ** (1 / (0.25 * steps))
    report = json.loads((out / "report.json").read_text())
    assert report["student_ema_decay"] == pytest.approx(decay, rel=1e-12)
    ref = seen["reset"][0]
    for state in seen["update"]:
        ref = {k: decay * v + (1 - decay) * state[k] if v.is_floating_point() else state[k]
               for k, v in ref.items()}
    saved, _ = load_student(out / "student.pt")
    last = seen["update"][-1]
    moved = 0.0
    for k, v in saved.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v.double(), ref[k], atol=1e-6, rtol=1e-6, msg=f"{k}: not the EMA")
            moved = max(moved, float((v.double() - last[k]).abs().max()))
        else:
            assert torch.equal(v, ref[k]), k
    assert moved > 1e-4, "the saved student equals the last student: the average changed nothing"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["student_ema"] is not None
    for k, v in saved.state_dict().items():
        assert torch.equal(v, ckpt["student_ema"][k].cpu()), k


def test_real_data_ceiling_fine_tunes_on_shuffled_training_images(tmp_path: Path, capsys) -> None:
    """benchmarks.dfqf_ceiling: stage 2 of DFQF on real training rows (shuffled, with the teacher's logits),
    reported and saved as not data-free."""
    import numpy as np

    from benchmarks.dfqf_ceiling import RealImages
    from benchmarks.dfqf_ceiling import main as ceiling_main
    from core.pixels import normalize
    from train.dfqf_config import resolve
    from train.dfqf_job import Job
    from train.distributed import setup_distributed
    from train.models import build_model
    from train.student import read_student

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    (data / "cifar10").mkdir(parents=True)
    train_x = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    train_y = np.repeat(np.arange(10), 4).astype(np.uint8)  # sorted by class, like the shipped files
    np.savez(data / "cifar10" / "train.npz", x=train_x, y=train_y)
    np.savez(data / "cifar10" / "test.npz", x=train_x[:20], y=train_y[:20])
    weights = tmp_path / "resnet20.pt"
    torch.save(build_model("resnet20").state_dict(), weights)
    flags = ["--smoke", "--arch", "resnet20", "--weights", str(weights), "--data-dir", str(data), "--progress", "false"]

    cfg = resolve([*flags, "--synth-images", "24", "--out", str(tmp_path / "unit")])
    run = Job(cfg, setup_distributed("cpu"), RealImages())
    real = run.source.draw(run)
    rows = [int(np.flatnonzero((train_x == im.numpy()).all(axis=(1, 2, 3)))[0]) for im in real["images"]]
    assert len(set(rows)) == 24 and rows != sorted(rows)  # distinct rows, not the class-sorted first ones
    assert torch.equal(real["labels"], torch.from_numpy(train_y[rows]).long())
    with torch.no_grad():
        expected = run.teacher(normalize(real["images"], run.info.mean, run.info.std))
    torch.testing.assert_close(real["teacher_logits"], expected)

    out = tmp_path / "ceiling"
    assert ceiling_main([*flags, "--images", "32", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["data_free"] is False and report["method"] == "real-data-kd" and report["real_train_images"] == 32
    assert 0 <= report["fakequant_top1"] <= 100
    assert [r["step"] for r in metrics(out) if r["stage"] == "student"] == [1, 2]  # 32 images / batch 16, 1 epoch
    assert read_student(out / "student.pt")["data_free"] is False
    assert not (out / "generator.pt").exists()
    assert ceiling_main([*flags, "--images", "41", "--out", str(tmp_path / "too_many")]) == 2
    assert "more than the 40 training images" in capsys.readouterr().err


def test_learned_steps_stay_positive_and_the_student_lowers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a step-size rate far above the steps (Adam moves each by about the rate), KD updates would push
    steps through zero (a ResNet56 run did, with 4e-5 against 1e-4); `keep_steps_positive` holds them at
    MIN_STEP, so every saved step is positive and the student lowers."""
    import train.dfqf as D
    from lower.compile import student_graph
    from train.quant.modules import MIN_STEP, ActQuantizer, WeightQuantizer

    monkeypatch.delenv("DFQF_DATA_DIR", raising=False)
    out = tmp_path / "run"
    assert D.main([*TINY, "--s-epochs", "1", "--s-scale-lr", "1.0", "--s-ema", "0", "--out", str(out)]) == 0
    student, _ = load_student(out / "student.pt")
    steps = torch.cat([m.scale.detach().flatten() for m in student.modules()
                       if isinstance(m, (ActQuantizer, WeightQuantizer))])
    floor = torch.tensor(MIN_STEP, dtype=steps.dtype)
    assert bool((steps >= floor).all())
    assert int((steps == floor).sum()) > 0  # the clamp acted
    student_graph(out / "student.pt")  # lowers
