"""Issue 18, artifacts: lower.compile never deletes what it did not create and never lets two writers both
claim one folder; the manifest is a closed description; every malformed artifact file is one DFQFError; the
runtime's contracts (float32, batch sizes, no growth per load)."""
from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.errors import DFQFError
from core.files import sha256_file, write_json_atomic
from lower.compile import CompileOptions, compile_student
from lower.compile import main as compile_main
from runtime import load
from train.quant.convert import QuantConfig
from train.student import save_student

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_students, tmp_path_factory) -> dict[str, Path]:
    """A W8A8 and a W4A4 tinynet student, each with its llvm artifact."""
    root = tmp_path_factory.mktemp("trust")
    out = {}
    for bits in (8, 4):
        student, _ = tiny_students(bits, bits)
        path = root / f"w{bits}" / "student.pt"
        save_student(path, student, "tinynet", 10, QuantConfig(bits, bits), method="minmax", data_free=True)
        compile_student(CompileOptions(path, "llvm", path.parent / "art", onnx=False))
        out[f"w{bits}"], out[f"s{bits}"] = path.parent / "art", path
    return out


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rehash(artifact: Path, edit=None) -> None:
    """Rewrite the manifest with the files' current hashes (what someone who edits an artifact would do),
    after `edit(manifest)`."""
    m = json.loads((artifact / "manifest.json").read_text())
    for name, meta in m["files"].items():
        if (artifact / name).is_file():
            meta.update(sha256=sha256_file(artifact / name), bytes=(artifact / name).stat().st_size)
    if edit is not None:
        edit(m)
    (artifact / "manifest.json").write_text(json.dumps(m))


def one_error_line(code: int, capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


# -- defect 2: --force replaces artifact folders only -------------------------------------------------------
def test_force_refuses_a_run_folder_and_a_file(tiny, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("student.pt", "checkpoint.pt", "generator.pt", "config.json"):
        (run / name).write_bytes(b"finished work")
    assert "holds no artifact manifest" in one_error_line(
        compile_main([str(tiny["s8"]), "--out", str(run), "--force", "--no-onnx"]), capsys)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "generator.pt", "student.pt"]
    assert all(p.read_bytes() == b"finished work" for p in run.iterdir())
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    assert "not a folder" in one_error_line(compile_main([str(tiny["s8"]), "--out", str(file), "--force"]), capsys)
    assert file.read_text() == "mine"


def test_force_replaces_an_artifact_and_cleans_a_killed_writers_leftovers(tiny, tmp_path) -> None:
    out = copy_artifact(tiny["w8"], tmp_path / "art")
    stale = tmp_path / ".art.k1ll3d"  # the temp folder of a compile that was SIGKILLed
    stale.mkdir()
    (stale / "model.so").write_bytes(b"half")
    before = json.loads((out / "manifest.json").read_text())["created"]
    manifest = compile_student(CompileOptions(tiny["s4"], "llvm", out, onnx=False, force=True))
    assert manifest["student"]["sha256"] == sha256_file(tiny["s4"]) and not stale.exists()
    assert load(out).graph.node("layer1_0_conv1").attrs["weight_bits"] == 4 and before
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # not mkdtemp's 0700


def test_atomically_written_files_are_as_readable_as_any_other(tmp_path) -> None:
    write_json_atomic({"a": 1}, tmp_path / "report.json")
    assert oct((tmp_path / "report.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- defect 3: two writers of one new folder ------------------------------------------------------------------
def test_two_concurrent_compiles_to_one_new_out_one_wins(tiny, tmp_path) -> None:
    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "lower.compile", str(tiny["s8"]), "--out", str(out), "--no-onnx"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2).strip().splitlines()
    assert len(loser) == 1 and ("another process is writing" in loser[0] or "already exists" in loser[0])
    load(out)  # the winner's artifact, complete and verified
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # no temp folder, no lock file left


# -- defect 4: the manifest is closed --------------------------------------------------------------------------
@pytest.mark.parametrize("edit, message", [
    (lambda m: m["files"].pop("graph.json"), "does not list graph.json"),
    (lambda m: m["files"].pop("model.so"), "does not list model.so"),
    (lambda m: m["files"].update({"../../../etc/hostname": {"sha256": "0" * 64, "bytes": 1}}), "not a plain name"),
    (lambda m: m["files"].update({"/etc/hostname": {"sha256": "0" * 64, "bytes": 1}}), "not a plain name"),
    (lambda m: m.update(files=list(m["files"])), "'files' must map"),
    (lambda m: m.update(files=None), "'files' must map"),
    (lambda m: m["files"]["params.npz"].pop("sha256"), "needs a sha256"),
    (lambda m: m["files"]["params.npz"].update(sha256="xyz"), "needs a sha256"),
    (lambda m: m.update(version=99), "unsupported artifact version"),
])
def test_manifest_edits_are_refused(tiny, tmp_path, edit, message) -> None:
    art = copy_artifact(tiny["w8"], tmp_path / "art")
    rehash(art, edit)
    with pytest.raises(DFQFError, match=message):
        load(art)


# -- defect 5: malformed files, re-hashed so that only their content is wrong ---------------------------------
def _object_array_params(art: Path) -> None:
    (art / "params.npz").unlink()
    np.savez(art / "params.npz", evil=np.array([object()], dtype=object))


def _wrong_shape(art: Path) -> None:
    with np.load(art / "params.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["conv1/weight"] = arrays["conv1/weight"][:, :, :2]
    np.savez(art / "params.npz", **arrays)


def _bad_graph_node(art: Path) -> None:
    g = json.loads((art / "graph.json").read_text())
    g["nodes"][1]["inputs"] = ["nowhere"]
    (art / "graph.json").write_text(json.dumps(g))


@pytest.mark.parametrize("damage, message", [
    (lambda a: (a / "params.npz").write_bytes(b"not a zip"), "not an integer parameter file"),
    (_object_array_params, "not an integer parameter file"),
    (_wrong_shape, "conv1/weight"),
    (lambda a: (a / "graph.json").write_text("{not json"), "not an integer graph"),
    (lambda a: (a / "graph.json").write_text("[1, 2]"), "not an integer graph"),
    (_bad_graph_node, "before it is computed"),
    (lambda a: (a / "model.so").write_bytes(b"\x7fELF garbage"), "cannot load the compiled library"),
])
def test_malformed_artifact_files_are_one_dfqf_error(tiny, tmp_path, damage, message) -> None:
    art = copy_artifact(tiny["w8"], tmp_path / "art")
    damage(art)
    rehash(art)
    with pytest.raises(DFQFError, match=message):
        load(art)


def test_model_so_of_another_compile_is_refused(tiny, tmp_path) -> None:
    art = copy_artifact(tiny["w8"], tmp_path / "art")
    shutil.copy(tiny["w4"] / "model.so", art / "model.so")  # int4 weights are packed: other parameter shapes
    rehash(art)
    with pytest.raises(DFQFError, match="different compiles"):
        load(art).predict_int(np.zeros((1, 16, 16, 3), np.uint8))


# -- defect 11 and 12: the runtime's contracts -------------------------------------------------------------------
def test_predict_is_float32_and_batch_size_is_checked(tiny) -> None:
    model = load(tiny["w8"])
    x = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    assert model.predict(x, batch_size=2).dtype == np.float32
    for bad in (0, -1, 2.5, True):
        with pytest.raises(DFQFError, match="batch_size must be a positive integer"):
            model.predict(x, batch_size=bad)


def _rss_kb() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read the resident size")
def test_loading_again_does_not_grow_memory(tiny) -> None:
    """TVM keeps ~80 kB per load_module call; the runtime loads each verified library once (measured before the
    fix: +85 kB per load/unload cycle, 2.5 MB over these 30)."""
    for _ in range(5):
        load(tiny["w8"])
    gc.collect()
    before = _rss_kb()
    for _ in range(30):
        load(tiny["w8"])
    gc.collect()
    assert _rss_kb() - before < 1000
