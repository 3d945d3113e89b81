"""lower.compile -> artifact -> runtime: the compiled TVM module equals the NumPy reference bit for bit,
ORT runs the QDQ export, artifacts are verified, and bad input is one clear line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.errors import DFQFError
from lower.compile import CompileOptions, compile_student
from lower.reference import run_graph
from runtime import load, load_onnx
from toolkit import main_in_process, one_error_line
from train.quant.convert import QuantConfig
from train.student import save_student

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifacts(tiny_students, tmp_path_factory) -> dict[str, Path]:
    """llvm artifacts of the tiny W8A8 and W4A4 students (compiled once for the module)."""
    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for bits in [(8, 8), (4, 4)]:
        student, info = tiny_students(*bits)
        path = root / f"w{bits[0]}a{bits[1]}" / "student.pt"
        save_student(path, student, "tinynet", 10, QuantConfig(wbits=bits[0], abits=bits[1]), method="minmax",
                     data_free=True)
        compile_student(CompileOptions(path, "llvm", path.parent / "llvm"))
        out[f"w{bits[0]}a{bits[1]}"] = path.parent / "llvm"
    return out


def _pixels(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", ["w8a8", "w4a4"])
def test_tvm_module_equals_reference_bit_for_bit(artifacts, name):
    model = load(artifacts[name])
    for n in (1, 5):  # one module, any batch size
        x = _pixels(n, seed=n)
        np.testing.assert_array_equal(model.predict_int(x), run_graph(model.graph, x))
    x = _pixels(7)
    np.testing.assert_allclose(model.predict(x, batch_size=3), run_graph(model.graph, x) * model.graph.output_scale,
                               rtol=1e-6)


def test_manifest_records_bits_sizes_and_hashes(artifacts):
    m = json.loads((artifacts["w4a4"] / "manifest.json").read_text())
    assert m["target"] == "llvm" and m["bits"]["weights"]["conv1"] == 8 and m["bits"]["weights"]["layer1_0_conv1"] == 4
    assert {"model.so", "model.onnx", "params.npz", "graph.json"} <= set(m["files"])
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    sizes = m["param_bytes"]
    assert sizes["stored"] < sizes["int8"] < sizes["fp32"]


def test_onnx_export_runs_under_ort_and_agrees(artifacts):
    ort = load_onnx(artifacts["w8a8"])
    x = _pixels(32)
    ref = run_graph(ort.graph, x) * ort.graph.output_scale
    got = ort.predict(x)
    assert got.shape == ref.shape
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_bad_images_and_corrupted_artifact(artifacts, tmp_path: Path):
    model = load(artifacts["w8a8"])
    with pytest.raises(DFQFError, match=r"expected uint8 images of shape \[N, 16, 16, 3\]"):
        model.predict(np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(DFQFError, match="expected uint8 images"):
        model.predict(np.zeros((2, 3, 16, 16), np.uint8))
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in artifacts["w8a8"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    lib = bytearray((broken / "model.so").read_bytes())
    lib[-100] ^= 0xFF
    (broken / "model.so").write_bytes(bytes(lib))
    with pytest.raises(DFQFError, match="model.so does not match its sha256"):
        load(broken)
    with pytest.raises(DFQFError, match="runs on cpu, not cuda"):
        load(artifacts["w8a8"], device="cuda")


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args, message", [
    (["nope/student.pt"], "student file not found"),
    (["{student}", "--target", "vulkan"], "unknown target 'vulkan'; known: llvm, cuda"),
    (["{student}", "--out", "{existing}"], "already exists"),
])
def test_compile_bad_input_is_one_line_exit_2(artifacts, args, message, capsys):
    student = artifacts["w8a8"].parent / "student.pt"
    args = [a.format(student=student, existing=artifacts["w8a8"]) for a in args]
    assert message in one_error_line(*main_in_process("lower.compile", args, capsys))


def test_parity_bad_artifact_is_one_line_exit_2(tmp_path: Path):
    r = _cli("runtime.parity", str(tmp_path), "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "not a DFQF artifact" in r.stderr and "Traceback" not in r.stderr


def test_parity_cli_on_a_resnet20_student(shared_data: Path, tmp_path: Path):
    """Real teacher and images: DFQ W4A4 student -> llvm artifact -> runtime.parity on 100 test images."""
    teacher = shared_data / "teachers" / "resnet20_cifar10_jpeg.pt"
    r = _cli("train.ptq", "--method", "dfq", "--weights", str(teacher), "--out", str(tmp_path / "ptq"),
             "--eval-limit", "200")
    assert r.returncode == 0, r.stderr
    compile_student(CompileOptions(tmp_path / "ptq" / "student.pt", "llvm", tmp_path / "art"))
    r = _cli("runtime.parity", str(tmp_path / "art"), "--data-dir", str(shared_data), "--limit", "100", "--fp64-all")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "art" / "parity.json").read_text())
    assert result["n"] == 100 and result["tvm_equals_reference"] is True
    assert result["integer_top1"] == result["reference_top1"]
    assert result["top1_agreement"] >= 0.99 and result["ort_top1_agreement"] >= 0.97
    assert result["top1_agreement_vs_fp64_fakequant"] >= 0.99 and result["fp64_images"] == 100
    assert 0 <= result["disagreements_where_fp64_student_agrees_with_integer"] <= result["disagreements"] <= 1
    assert result["max_lsb_diff_per_layer"]["input_aq"] == 0
    assert max(result["isolated_max_lsb_diff_per_layer"].values()) <= 1
    assert {"fp_top1", "fakequant_top1", "ort_top1"} <= set(result)


def test_profile_times_every_kernel_call_and_counts_vnni_macs(artifacts) -> None:
    from lower.schedules.x86_conv import supports
    from lower.targets import make_target, select_schedules
    from runtime.profile import kernel_macs, main, profile, record_kernel_calls

    path = artifacts["w8a8"]
    model = load(path)
    pixels = np.random.default_rng(3).integers(0, 256, (2, *model.graph.input_shape), dtype=np.uint8)
    before = model.predict_int(pixels)
    calls = record_kernel_calls(model, pixels)
    assert np.array_equal(model.predict_int(pixels), before)  # the instrument is gone and changed nothing
    assert calls and not any(symbol.startswith("vm.builtin.") for symbol, _, _ in calls)

    report = profile(path, batch=2, repeat=1)
    assert report["kernel_calls"] == len(calls) == sum(r["calls"] for r in report["table"])
    assert report["kernels_ms"] > 0 and all(r["ms"] > 0 for r in report["table"])
    # MACs: the x86 conv kernels compute every conv that `supports` admits and the dense layer (a 1x1 conv on a
    # 1x1 image), on output channels padded to the kernel's lanes (16 AMX and VNNI, 8 AVX2) and input channels
    # padded to 4; nothing else is counted
    g = model.graph
    expected = 0
    chosen = select_schedules("llvm", make_target("llvm"))
    lanes = {"x86_amx": 16, "x86_vnni": 16, "x86_avx2": 8}.get(chosen.name if chosen else None)
    if lanes:
        for node in g.nodes:
            if node.op == "conv2d" and supports(node, g.tensors[node.inputs[0]].dtype):
                o, cin, kh, kw = np.shape(node.params["weight"])
                _, oh, ow = g.tensors[node.name].shape
                expected += 2 * oh * ow * -(-o // lanes) * lanes * kh * kw * -(-cin // 4) * 4
            elif node.op == "dense":
                o, k = np.shape(node.params["weight"])
                expected += 2 * -(-o // lanes) * lanes * -(-k // 4) * 4
    assert sum(kernel_macs(symbol, args) for symbol, _, args in calls) == expected
    assert sum(r["macs"] for r in report["table"]) == expected

    assert main([str(path), "--batch", "1", "--repeat", "1"]) == 0


def test_small_batches_run_on_one_thread_with_identical_results(artifacts) -> None:
    """In a process allowed two TVM threads: a batch below parallel_min_batch runs on one, a larger one on
    both, with the same integers (and the reference's)."""
    from runtime.model import parallel_min_batch

    assert load(artifacts["w8a8"]).executable.parallel_min_batch == parallel_min_batch(load(artifacts["w8a8"]).graph)
    script = f"""
import json, numpy as np
from lower.reference import run_graph
from runtime.executable import cpu_threads
from runtime import load
model = load({str(artifacts["w8a8"])!r})
ex = model.executable
ex.parallel_min_batch = 4
x = np.random.default_rng(5).integers(0, 256, (4, *model.graph.input_shape), dtype=np.uint8)
small = ex(x[:1], model.params); t_small = cpu_threads()
large = ex(x, model.params); t_large = cpu_threads()
print(json.dumps([ex.max_threads, t_small, t_large, bool(np.array_equal(small, large[:1])),
                  bool(np.array_equal(large, run_graph(model.graph, x)))]))
"""
    env = {**os.environ, "TVM_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [2, 1, 2, True, True]
