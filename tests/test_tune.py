"""`lower.compile --tune` / `--tuning` (`lower.tune`): register tiles searched on this machine, cached in the
artifact, reusable, and never a change in the integers the model computes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm_ffi import structural_equal

from core.errors import DFQFError
from lower import tune as tuner
from lower import tvm_build as tb
from lower.compile import CompileOptions, compile_student
from lower.reference import run_graph
from lower.schedules import x86_vnni
from lower.schedules.x86_conv import ConvShape, KernelRequest
from lower.targets import make_target, select_schedules
from runtime import load
from toolkit import main_in_process, one_error_line
from train.quant.convert import QuantConfig
from train.student import save_student

REPO = Path(__file__).resolve().parents[1]
SCHEDULES = select_schedules("llvm", make_target("llvm"))
requires_schedules = pytest.mark.skipif(SCHEDULES is None, reason="host has no hand-scheduled conv kernels")


def _request(in_hw, cin, out_blocks, kernel=(3, 3), stride=(1, 1)) -> KernelRequest:
    """A request for a kernel on the unpadded input `in_hw` padded by 1 (3x3) or 0 (1x1)."""
    padding = tuple((k - 1) // 2 for k in kernel)
    return KernelRequest(x86_vnni.FAMILY, ConvShape(in_hw, padding, cin, "uint8", out_blocks, kernel, stride, (1, 1)),
                         None, ["c"])


@pytest.mark.parametrize("in_hw,out_blocks,kernel,stride", [
    ((32, 32), 1, (3, 3), (1, 1)),  # OW 32
    ((16, 16), 4, (3, 3), (1, 1)),  # OW 16
    ((7, 7), 3, (3, 3), (1, 1)),  # OW 7: prime
    ((16, 16), 2, (1, 1), (2, 2)),  # OW 8
])
def test_candidates_divide_and_fit_the_accumulators(in_hw, out_blocks, kernel, stride):
    r = _request(in_hw, 16, out_blocks, kernel, stride)
    ow, blocks = r.tile_extents
    found = tuner.candidates(r)
    assert found[0] == x86_vnni.register_tile(ow, blocks)  # the default first
    assert 1 <= len(found) <= tuner.MAX_CANDIDATES and len(set(found)) == len(found)
    for zt, obt in found:
        assert ow % zt == 0 and blocks % obt == 0 and 2 <= zt * obt <= x86_vnni.MAX_ACC


@pytest.fixture(scope="module")
def tuned(tiny_students, tmp_path_factory) -> Path:
    """The tiny W8A8 student compiled with a small tuning budget."""
    student, _ = tiny_students(8, 8)
    path = tmp_path_factory.mktemp("tune") / "student.pt"
    save_student(path, student, "tinynet", 10, QuantConfig(wbits=8, abits=8), method="minmax", data_free=True)
    compile_student(CompileOptions(path, "llvm", path.parent / "tuned", onnx=False, tune=3.0))
    return path.parent / "tuned"


def _assert_exact(artifact: Path) -> None:
    model = load(artifact)
    x = np.random.default_rng(5).integers(0, 256, (5, *model.graph.input_shape), dtype=np.uint8)
    np.testing.assert_array_equal(model.predict_int(x), run_graph(model.graph, x))


@requires_schedules
def test_tune_writes_tuning_json_with_candidate_tiles_and_stays_exact(tuned):
    manifest = json.loads((tuned / "manifest.json").read_text())
    assert "tuning.json" in manifest["files"] and manifest["tuning"]["file"] == "tuning.json"
    result = tuner.load_tuning(tuned / "tuning.json")
    requests = tuner.kernel_requests(load(tuned).graph, SCHEDULES)
    assert set(result["kernels"]) == set(requests)
    assert manifest["tuning"]["kernels"] == len(requests) and manifest["tuning"]["tuned"] >= 1
    for key, entry in result["kernels"].items():
        assert tuple(entry["tile"]) in tuner.candidates(requests[key])
        assert entry["status"] in ("tuned", "default") and (entry["status"] == "default") == (not entry["ms"])
    _assert_exact(tuned)


@requires_schedules
def test_given_tuning_file_is_applied_and_stays_exact(tuned, tmp_path: Path):
    result = json.loads((tuned / "tuning.json").read_text())
    for entry in result["kernels"].values():
        entry["tile"] = [1, 1]  # one accumulator: never a candidate, but a valid tile
    result["kernels"]["not-a-kernel-of-this-graph"] = {"tile": [3, 3]}
    forced = tmp_path / "tuning.json"
    forced.write_text(json.dumps(result))

    g = load(tuned).graph
    requests = tuner.kernel_requests(g, SCHEDULES)
    tiles = tuner.tiles({"kernels": tuner.matching(tuner.load_tuning(forced), requests)})
    assert tiles == {key: (1, 1) for key in requests}
    mod = tb.build_relax(g, SCHEDULES, tiles=tiles)
    suffix = requests[next(iter(requests))].family.suffix
    built = [f for gv, f in mod.functions_items() if gv.name_hint.endswith(suffix)]
    assert built
    for r in requests.values():  # every kernel in the module is the (1, 1)-tiled one, not the default
        def kernel(tile):
            return r.family.kernel(tvm.tirx.Var("n", "int64"), r.shape, epilogue=r.epilogue, tile=tile).body

        assert any(structural_equal(f.body, kernel((1, 1)), map_free_vars=True) for f in built)
        if tuner.default_tile(r) != (1, 1):
            assert not any(structural_equal(f.body, kernel(None), map_free_vars=True) for f in built)

    out = tmp_path / "art"
    compile_student(CompileOptions(tuned.parent / "student.pt", "llvm", out, onnx=False, tuning=forced))
    applied = json.loads((out / "tuning.json").read_text())["kernels"]
    assert set(applied) == set(requests)
    assert all(e["tile"] == [1, 1] and e["status"] == "from file" for e in applied.values())
    _assert_exact(out)


def test_bad_tuning_file(tmp_path: Path):
    with pytest.raises(DFQFError, match="not found"):
        tuner.load_tuning(tmp_path / "missing.json")
    (tmp_path / "v1.json").write_text(json.dumps({"version": 1, "kernels": {}}))  # keys of padded inputs
    with pytest.raises(DFQFError, match="not a version-2 tuning.json"):
        tuner.load_tuning(tmp_path / "v1.json")


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"version": 99, "kernels": {}})])
def test_bad_tuning_file_is_one_line_exit_2(tuned, tmp_path: Path, content, capsys):
    bad = tmp_path / "tuning.json"
    if content is not None:
        bad.write_text(content)
    line = one_error_line(*main_in_process("lower.compile", [tuned.parent / "student.pt", "--out", tmp_path / "out",
                                                             "--no-onnx", "--tuning", bad], capsys))
    assert line.startswith("error: tuning file")
    assert not (tmp_path / "out").exists()


def test_tune_without_hand_scheduled_kernels_does_nothing(tiny_students, tmp_path: Path):
    student, _ = tiny_students(8, 8)
    path = tmp_path / "student.pt"
    save_student(path, student, "tinynet", 10, QuantConfig(wbits=8, abits=8), method="minmax", data_free=True)
    logs: list[str] = []
    manifest = compile_student(CompileOptions(path, "llvm", tmp_path / "art", onnx=False, schedules="none", tune=1.0),
                               log=logs.append)
    assert "tuning.json" not in manifest["files"] and "tuning" not in manifest
    assert any("nothing to tune" in line for line in logs)


@requires_schedules
def test_no_budget_keeps_every_default_tile(tuned):
    requests = tuner.kernel_requests(load(tuned).graph, SCHEDULES)
    result = tuner.tune(requests, make_target("llvm"), seconds=0.0)
    assert result["rounds"] == 0 and set(result["kernels"]) == set(requests)
    assert all(e["status"] == "default" and e["tile"] == e["default"] and not e["ms"]
               for e in result["kernels"].values())


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "soon"])
def test_tune_budget_must_be_a_finite_positive_number(text, tmp_path, capsys):
    from lower.compile import main

    try:
        code = main([str(tmp_path / "student.pt"), "--tune", text])
    except SystemExit as e:  # argparse: not a number
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "tune" in err[0], err
