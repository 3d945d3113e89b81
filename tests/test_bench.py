"""benchmarks.bench on a tiny artifact: the JSON report has its keys and positive timings, unavailable engines
are reported instead of crashing, and bad input is one error line with exit code 2. Timing *values* are
not asserted: they belong in benchmarks/results."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import int_list
from lower.compile import CompileOptions, compile_student
from toolkit import main_in_process, one_error_line
from train.quant.convert import QuantConfig
from train.student import save_student

REPO = Path(__file__).resolve().parents[1]
# fast engines only: torch.compile (torch_int8) and TVM's fp32 build take tens of seconds each
ENGINES = "torch_fp32,ort_fp32,ort_int8,tvm_int8,ort_dfqf_int8"


@pytest.fixture(scope="module")
def tiny_artifact(tiny_students, tmp_path_factory) -> Path:
    student, _ = tiny_students(8, 8)
    path = tmp_path_factory.mktemp("bench") / "w8a8" / "student.pt"
    save_student(path, student, "tinynet", 10, QuantConfig(wbits=8, abits=8), method="minmax", data_free=True)
    compile_student(CompileOptions(path, "llvm", path.parent / "llvm"))
    return path.parent / "llvm"


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_bench_reports_every_engine(tiny_artifact):
    proc = _bench(str(tiny_artifact), "--batch", "1", "--threads", "1", "--repeat", "1", "--warmup", "1",
                  "--engines", ENGINES, "--vnni-peak", "100", "--calib-images", "32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("tvm_int8_ms", "ort_int8_ms", "ort_fp32_ms", "torch_fp32_ms"):
        assert report[key] > 0, key
    assert "torch_int8_ms" in report  # not run here: None
    rows = {r["engine"]: r for r in report["results"]}
    assert set(rows) == set(ENGINES.split(","))
    for name, r in rows.items():
        assert r["status"] == "ok" and r["batch"] == 1 and r["threads"] == 1, r
        assert r["ms"] > 0 and r["images_per_s"] > 0 and r["timed_calls"] >= 1
    assert rows["ort_int8"]["speedup_vs_ort_int8"] == 1.0
    assert rows["tvm_int8"]["gops"] > 0 and 0 < rows["tvm_int8"]["vnni_peak_fraction"]
    assert report["macs_per_image"] > 0 and report["vnni_peak_gmacs_per_core"] == 100


def test_graph_macs_counts_conv_and_dense():
    """Hand-counted: on the 3 x 8 x 8 input, a 3x3 conv to 8 channels at stride 2 (4 x 4 outputs), a grouped
    1x1 conv (2 groups) to 8 channels, and a dense 128 -> 10 after the reshape."""
    from toolkit import GraphMaker

    m = GraphMaker(0)
    x = m.requantize("r1", [m.conv("c1", "q", 8, stride=(2, 2))])
    x = m.requantize("r2", [m.conv("c2", x, 8, k=1, padding=(0, 0), groups=2)])
    m.dense("d", m.add("reshape", "flat", [x], {"shape": [128]}), 10)
    g = m.graph()
    assert g.layer_macs() == {"c1": 8 * 4 * 4 * 3 * 3 * 3, "c2": 8 * 4 * 4 * 4, "d": 10 * 128}
    assert g.total_macs() == 3456 + 512 + 1280


@pytest.mark.parametrize("args, message", [
    (["--batch", "1,x"], "--batch"),
    (["--batch", "0"], "--batch"),
    (["--threads", "1,1"], "--threads"),
    (["--engines", "tvm_int3"], "unknown engine"),
])
def test_bad_input_is_one_error_line(tiny_artifact, args, message, capsys):
    assert message in one_error_line(*main_in_process("benchmarks.bench", [str(tiny_artifact), *args], capsys))


def test_missing_artifact_is_one_error_line(tmp_path, capsys):
    code, out, err = main_in_process("benchmarks.bench", [str(tmp_path / "nope")], capsys)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"error: artifact folder not found: {tmp_path / 'nope'}"]


def test_bad_batch_from_the_command_line(tmp_path):
    proc = _bench(str(tmp_path), "--batch", "1,,2")
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:")


def test_int_list():
    assert int_list("1,128") == [1, 128]
    with pytest.raises(Exception):
        int_list("")


def test_speed_table_goal_and_markdown_from_a_report(tmp_path):
    """The table script's rendering (no timing): best peer, TVM speedups by median and min, unavailable rows."""
    from benchmarks.speed_table import bar_chart, goal_rows, markdown

    def ok(engine, ms, min_ms):
        return {"engine": engine, "batch": 1, "threads": 1, "status": "ok", "ms": ms, "min_ms": min_ms,
                "timed_calls": 5, "speedup_vs_ort_int8": 1.0}

    results = [ok("ort_int8", 2.0, 1.0), ok("torch_int8", 3.0, 0.5), ok("tvm_int8", 1.0, 0.5),
               {"engine": "torch_fp32", "batch": 1, "threads": 1, "status": "unavailable", "reason": "no teacher"}]
    goal = goal_rows(results)
    assert goal == [{"batch": 1, "threads": 1, "best_peer": "ort_int8", "best_peer_ms": 2.0,
                     "tvm_int8_speedup_vs_best_peer": 2.0, "best_peer_min": "torch_int8", "best_peer_min_ms": 0.5,
                     "tvm_int8_min_speedup_vs_best_peer": 1.0}]
    report = {"results": results, "batch": [1], "threads": [1], "target": {"kind": "llvm"}, "arch": "tinynet",
              "artifacts": {"int8": {"path": "a", "created": "t"}}, "teacher": "t.pt", "ort_int8_calibration": "x",
              "repeat": 5, "warmup": 1, "budget_s": 1.0, "min_timed_calls": 3, "macs_per_image": 10**6,
              "load_before": 1.0, "load_after": 1.0, "goal": goal, "unavailable": {"torch_fp32": "no teacher"}}
    env = {"date": "d", "command": "c", "cpu": "cpu", "cores": 2, "python": "3", "torch": "2"}
    peak = {"gmacs": 200.0, "gops": 400.0, "vpdpbusd_zmm_per_cycle": 1.0, "ghz": 3.0}
    md = markdown(report, env, peak, 60.0)
    assert "| 1 | 1 | ort_int8 | 2.000 | 2.00× | – | torch_int8 | 0.500 | 1.00× | – | no |" in md
    assert "torch_fp32: no teacher" in md and "| torch fp32 eager | unavailable |" in md
    bar_chart(report, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 0
