"""Issue 18, inputs: no code runs from any file, bad values are one error line before any work is done, and
finished work is never lost; plus a fuzz of mutated configs and artifact files."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import DFQFError
from train.dfqf_config import DFQFConfig, resolve
from train.models import build_model, load_teacher

REPO = Path(__file__).resolve().parents[1]
TINY = ["--smoke", "--arch", "tinynet", "--progress", "false"]


class Payload:
    """Unpickling this creates `marker`: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def one_error_line(code: int, capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


@pytest.fixture()
def resnet_weights(tmp_path) -> Path:
    path = tmp_path / "r20.pt"
    torch.save(build_model("resnet20").state_dict(), path)
    return path


# -- defect 1: no code from any file a user may receive -------------------------------------------------------
@pytest.mark.parametrize("target", ["checkpoint", "student", "weights", "generator", "synthetic"])
def test_pickled_payloads_never_run(target, tmp_path) -> None:
    from core.files import load_torch_file
    from train.generator import load_generator
    from train.models.registry import read_state_dict
    from train.run_state import load_checkpoint
    from train.student import read_student

    marker = tmp_path / "pwned"
    path = tmp_path / ("checkpoint.pt" if target == "checkpoint" else f"{target}.pt")
    torch.save({"state_dict": Payload(marker)}, path)
    readers = {"checkpoint": lambda: load_checkpoint(tmp_path), "student": lambda: read_student(path),
               "weights": lambda: read_state_dict(path), "generator": lambda: load_generator(path),
               "synthetic": lambda: load_torch_file(path, "synthetic set")}
    with pytest.raises(DFQFError, match="pickled Python objects"):
        readers[target]()
    assert not marker.exists()


def test_resume_from_a_crafted_checkpoint_is_refused(tmp_path, capsys, monkeypatch) -> None:
    from train.dfqf import main

    monkeypatch.delenv("DFQF_DATA_DIR", raising=False)
    out, marker = tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(resolve([*TINY, "--out", str(out)]).to_dict()))
    torch.save({"stage": Payload(marker)}, out / "checkpoint.pt")
    assert "pickled Python objects" in one_error_line(main([*TINY, "--out", str(out), "--resume"]), capsys)
    assert not marker.exists()


# -- defect 6: NaN/inf teachers and students -----------------------------------------------------------------
def test_nan_teacher_is_refused_naming_the_tensor(tmp_path, capsys) -> None:
    from train.ptq import main

    state = build_model("resnet20").state_dict()
    state["layer2.1.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    with pytest.raises(DFQFError, match="tensor layer2.1.conv1.weight holds 1 NaN/inf"):
        load_teacher("resnet20", path)
    line = one_error_line(main(["--method", "minmax", "--weights", str(path), "--out", str(tmp_path / "o")]), capsys)
    assert "layer2.1.conv1.weight" in line and not (tmp_path / "o" / "student.pt").exists()


def test_raw_pickled_model_is_one_clean_line(tmp_path) -> None:
    path = tmp_path / "model.pt"
    torch.save(build_model("resnet20"), path)  # a whole module, not a state_dict
    r = subprocess.run([sys.executable, "-m", "train.ptq", "--method", "minmax", "--weights", str(path), "--out",
                        str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "save a state_dict instead" in lines[0], r.stderr
    assert "\x1b" not in r.stderr  # no terminal escape codes from torch's message


# -- defect 7: every config value is type-checked -------------------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("seed", "x", "seed must be an integer"), ("weights", 123, "weights must be a string"),
    ("out", 5, "out must be a string"), ("latent_dim", 2.7, "latent_dim must be an integer"),
    ("g_steps", 1e400, "g_steps must be an integer"), ("g_steps", 2.5, "g_steps must be an integer"),
    ("conditional", "false", "conditional must be true or false"), ("eval_limit", "all", "must be an integer"),
    ("temperature", None, "must not be null"), ("s_ema", 2, "s_ema must be in 0..1"),
    ("wbits", 9, "wbits must be an integer in 2..8"), ("eval_limit", 0, "eval_limit must be positive"),
])
def test_bad_config_values_are_one_error(field, value, message, tmp_path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({field: value}))
    with pytest.raises(DFQFError, match=message):
        resolve(["--config", str(config)])


@pytest.mark.parametrize("module, args, message", [
    ("train.dfqf", ["--temperature", "inf"], "temperature must be a finite number, got inf"),
    ("train.dfqf", ["--eval-limit", "0"], "eval_limit must be positive"),
    ("benchmarks.bench", ["ART", "--budget", "nan"], "budget must be a finite number, got nan"),
    ("benchmarks.bench", ["ART", "--vnni-peak", "-5"], "vnni_peak must be positive"),
    ("train.ptq", ["--method", "dfq", "--out", "o", "--calib-size", "0"], "calib_size must be positive"),
])
def test_bad_flag_values_are_one_error(module, args, message, tmp_path, capsys) -> None:
    import importlib

    main = importlib.import_module(module).main
    args = [str(tmp_path) if a == "ART" else a for a in args]
    assert message in one_error_line(main(args), capsys)


def test_config_fuzz_gives_a_config_or_one_dfqf_error() -> None:
    """Random JSON values for random fields: DFQFConfig either accepts them or raises DFQFError."""
    rng = random.Random(0)
    values = [None, True, False, 0, -1, 1, 7, 2.5, -0.0, 1e400, float("nan"), "", "x", "4", [], {}, [1], {"a": 1}]
    names = [f.name for f in fields(DFQFConfig)]
    accepted = 0
    for _ in range(400):
        chosen = {n: rng.choice(values) for n in rng.sample(names, rng.randint(1, 3))}
        try:
            DFQFConfig(**chosen)
            accepted += 1
        except DFQFError:
            pass
    assert 0 < accepted < 400


# -- defect 8: tinynet with a data folder set -----------------------------------------------------------------
def test_tinynet_smoke_with_a_data_folder_set(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DFQF_DATA_DIR": str(tmp_path)}  # a folder without tinynet data
    r = subprocess.run([sys.executable, "-m", "train.dfqf", *TINY, "--out", str(tmp_path / "run")], cwd=REPO,
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "student.pt").is_file() and "fp_top1" not in json.loads(r.stdout.splitlines()[-1])


# -- defect 9: validation before the work -------------------------------------------------------------------------
def test_a_bad_data_folder_or_teacher_fails_before_the_run_folder_exists(resnet_weights, tmp_path, capsys) -> None:
    from train.dfqf import main

    data = tmp_path / "data"
    (data / "cifar10").mkdir(parents=True)
    (data / "cifar10" / "test.npz").write_bytes(b"garbage")
    out = tmp_path / "run"
    base = ["--smoke", "--weights", str(resnet_weights), "--progress", "false", "--out", str(out)]
    assert "cannot read" in one_error_line(main([*base, "--data-dir", str(data)]), capsys)
    assert not out.exists()
    wrong = tmp_path / "r56.pt"
    torch.save(build_model("resnet56").state_dict(), wrong)
    assert "unexpected keys" in one_error_line(main([*base[:1], "--weights", str(wrong), *base[3:]]), capsys)
    assert not out.exists()  # a failed validation leaves no config.json that would block the next run


def test_ptq_with_a_bad_data_folder_writes_nothing(tmp_path, capsys) -> None:
    from train.ptq import main

    data = tmp_path / "data"
    (data / "cifar10").mkdir(parents=True)
    np.savez(data / "cifar10" / "test.npz", x=np.zeros((2, 32, 32, 3), np.uint8))  # no labels
    out = tmp_path / "out"
    assert "lacks array(s) y" in one_error_line(main(["--method", "minmax", "--out", str(out), "--data-dir",
                                                      str(data), "--calib-size", "8"]), capsys)
    assert not (out / "student.pt").exists()


# -- defect 10 and 11: outputs and students of parity ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_artifact(tiny_students, tmp_path_factory) -> Path:
    from lower.compile import CompileOptions, compile_student
    from train.quant.convert import QuantConfig
    from train.student import save_student

    student, _ = tiny_students(8, 8)
    path = tmp_path_factory.mktemp("parity") / "student.pt"
    save_student(path, student, "tinynet", 10, QuantConfig(8, 8), method="minmax", data_free=True)
    compile_student(CompileOptions(path, "llvm", path.parent / "art"))
    return path.parent / "art"


def test_parity_on_tinynet_compares_random_images(tiny_artifact, capsys) -> None:
    from runtime.parity import main

    assert main([str(tiny_artifact), "--limit", "20", "--no-onnx"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 20 and result["integer_top1"] is None and result["tvm_equals_reference"] is True
    assert "random images" in result["images"] and result["top1_agreement"] >= 0.5


def test_parity_refuses_another_student_and_an_unwritable_report(tiny_artifact, tiny_students, tmp_path,
                                                                   capsys) -> None:
    from runtime.parity import main
    from train.quant.convert import QuantConfig
    from train.student import save_student

    other = tmp_path / "other.pt"
    save_student(other, tiny_students(4, 4)[0], "tinynet", 10, QuantConfig(4, 4), method="minmax", data_free=True)
    assert "not the student" in one_error_line(main([str(tiny_artifact), "--student", str(other)]), capsys)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = one_error_line(main([str(tiny_artifact), "--json-out", str(blocker / "parity.json")]), capsys)
    assert "cannot write the report" in line and "--json-out" in line


# -- defect 13: resume of a damaged run folder ---------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_tiny_run(tmp_path_factory) -> Path:
    """One finished tinynet smoke run (`--g-steps 2`); tests resume copies of it."""
    from train.dfqf import main

    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DFQF_DATA_DIR", raising=False)
        assert main([*TINY, "--g-steps", "2", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "config.json").write_text("{garbage"), "is not a run's config"),
    (lambda out: (out / "checkpoint.pt").write_bytes(b""), "cannot read checkpoint"),
    (lambda out: torch.save({"images": torch.zeros(3, 5, 5, 3, dtype=torch.uint8), "labels": torch.zeros(3),
                             "teacher_logits": torch.zeros(3, 10)}, out / "synthetic.pt"),
     "not a synthetic set of this run"),
])
def test_resume_of_a_damaged_run_is_one_error(damage, message, finished_tiny_run, tmp_path, capsys,
                                              monkeypatch) -> None:
    from train.dfqf import main

    monkeypatch.delenv("DFQF_DATA_DIR", raising=False)
    out = shutil.copytree(finished_tiny_run, tmp_path / "run")
    args = [*TINY, "--g-steps", "2", "--out", str(out)]
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    ck["stage"], ck["step"] = "student", 0  # resume into fine-tuning: the synthetic set is read back
    torch.save(ck, out / "checkpoint.pt")
    damage(out)
    code = main([*args, "--resume"])
    err = capsys.readouterr().err.strip().splitlines()  # progress lines may come first
    assert code == 2 and err[-1].startswith("error:") and message in err[-1] and "Traceback" not in "".join(err)


def test_resume_with_a_lower_learning_rate_keeps_the_original_config(finished_tiny_run, tmp_path,
                                                                     monkeypatch) -> None:
    from train.dfqf import main

    monkeypatch.delenv("DFQF_DATA_DIR", raising=False)
    out = shutil.copytree(finished_tiny_run, tmp_path / "run")
    original = (out / "config.json").read_text()
    assert main([*TINY, "--g-steps", "2", "--out", str(out), "--resume", "--s-lr", "5e-5"]) == 0
    assert (out / "config.json").read_text() == original
    assert json.loads((out / "config.resumed.json").read_text())["s_lr"] == 5e-5


# -- fuzz: mutated manifests and graphs, re-hashed --------------------------------------------------------------
def _mutate(value, rng: random.Random):
    choices = [None, [], {}, "x", -1, 0, 2**40, 1.5, [1, 2], {"k": 1}]
    if isinstance(value, dict) and value and rng.random() < 0.7:
        key = rng.choice(list(value))
        if rng.random() < 0.3:
            value.pop(key)
        else:
            value[key] = _mutate(value[key], rng)
        return value
    if isinstance(value, list) and value and rng.random() < 0.7:
        i = rng.randrange(len(value))
        value[i] = _mutate(value[i], rng)
        return value
    return rng.choice(choices)


def test_fuzzed_artifacts_load_correctly_or_fail_with_one_dfqf_error(tiny_artifact, tmp_path) -> None:
    from core.files import sha256_file
    from runtime import load

    rng = random.Random(1)
    x = np.zeros((2, 16, 16, 3), np.uint8)
    outcomes = {"error": 0, "ok": 0}
    for i in range(150):
        art = tmp_path / f"a{i}"
        shutil.copytree(tiny_artifact, art)
        name = rng.choice(["manifest.json", "graph.json"])
        doc = _mutate(json.loads((art / name).read_text()), rng)
        (art / name).write_text(json.dumps(doc))
        if name == "graph.json":  # re-hash, so the loader reads the mutated graph itself
            m = json.loads((art / "manifest.json").read_text())
            m["files"]["graph.json"].update(sha256=sha256_file(art / name), bytes=(art / name).stat().st_size)
            (art / "manifest.json").write_text(json.dumps(m))
        try:
            out = load(art).predict(x)
            assert out.dtype == np.float32 and out.shape[0] == 2
            outcomes["ok"] += 1
        except DFQFError:
            outcomes["error"] += 1
        shutil.rmtree(art)
    assert outcomes["error"] > 50, outcomes
