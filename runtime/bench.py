"""`python -m runtime.bench ARTIFACT [--batch 1,128] [--threads 1,2]`: latency of the integer model next to
its peers, on the same random uint8 images.

Engines (all take uint8 NHWC pixels; the FP ones normalize inside the model, as the integer graph does):
  torch_fp32       the FP teacher, torch eager
  torch_int8       the teacher through PT2E: torchao X86InductorQuantizer + torch.compile (freezing)
  ort_fp32         the teacher exported with torch.onnx, ONNX Runtime CPU
  ort_int8         ort_fp32 through onnxruntime quantize_static (QDQ, per-channel s8 weights, u8 activations)
  tvm_fp32         the teacher through relax from_exported_program and TVM's default llvm pipeline
  tvm_int<b>       the artifact's compiled integer graph (`runtime.load`); b = its weight bits
  ort_dfqf_int<b>  the artifact's own QDQ ONNX export under ONNX Runtime
An engine that cannot be built here is reported `unavailable` with the reason; it never stops the run.

Each thread count runs in its own process (TVM_NUM_THREADS / OMP_NUM_THREADS set before any thread pool
starts; torch.set_num_threads; ORT intra_op_num_threads; Inductor bakes the count into its kernels). Within
a process every engine is timed interleaved, round by round in rotating order, so load from other jobs
hits all of them alike; the median is reported. Slow engines stop after `--budget` seconds per
configuration (at least 3 timed calls). Progress goes to stderr; the last stdout line is JSON with
`<engine>_ms` for the first batch size and thread count and a `results` list with, per engine, batch and
threads: median/min ms, images/s, speedup over ort_int8 (ort_int8_ms / ms), top-1 agreement with
torch_fp32 on these images, and for integer engines GOP/s (2 x MACs of the integer graph's conv/dense
layers) and its fraction of the VNNI peak (`benchmarks.vnni_peak`, times the thread count).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lower.artifact import ONNX, load_graph, read_manifest
from lower.graph import IntGraph
from train.errors import CLIParser, DFQFError, cli_main, first_line, positive_int

REPO = Path(__file__).resolve().parents[1]
FP_ENGINES = ("torch_fp32", "torch_int8", "ort_fp32", "ort_int8", "tvm_fp32")
REFERENCE = "ort_int8"  # the speed every engine is compared with
MIN_TIMED = 3
THREAD_ENV = ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Idle pool threads of one engine must not spin on the cores the next engine in the round is timed on.
NO_SPIN_ENV = {"TVM_THREAD_POOL_SPIN_COUNT": "0", "OMP_WAIT_POLICY": "PASSIVE"}


def log(msg: str) -> None:
    print(f"[runtime.bench] {msg}", file=sys.stderr, flush=True)


def int_list(text: str) -> list[int]:
    """argparse type: '1,128' -> [1, 128] (positive, no duplicates)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) <= 0 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct positive integers, got {text!r}")
    return values


def graph_macs(graph: IntGraph) -> int:
    """Multiply-accumulates per image of the integer graph's conv2d and dense nodes (ResNet20 CIFAR: 40.55 M)."""
    return sum(graph.layer_macs().values())


# -- the FP model every FP engine runs --------------------------------------------------------------------
def pixel_model(teacher: Any, mean: list[float], std: list[float]) -> Any:
    """teacher(normalize(x)) for uint8 NHWC pixels x, as one torch module (exportable, compilable)."""
    import torch

    class PixelInput(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = teacher
            s, m = torch.tensor(std).view(1, -1, 1, 1), torch.tensor(mean).view(1, -1, 1, 1)
            self.register_buffer("gain", 1.0 / (255.0 * s))
            self.register_buffer("offset", -m / s)

        def forward(self, x):
            return self.net(x.permute(0, 3, 1, 2).float() * self.gain + self.offset)

    return PixelInput().eval()


def teacher_of(plan: dict[str, Any]) -> Any:
    from train.models import load_teacher

    teacher = Path(plan["teacher"]) if plan["teacher"] else None
    return pixel_model(load_teacher(plan["arch"], teacher, **plan["arch_kwargs"]), plan["mean"], plan["std"])


# -- preparation, once, in the parent process (files the workers load) -------------------------------------
def export_onnx_fp32(model: Any, shape: tuple[int, ...], path: Path) -> Path:
    import torch

    x = torch.zeros((2, *shape), dtype=torch.uint8)
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["pixels"], output_names=["logits"],
                      dynamic_axes={"pixels": {0: "N"}, "logits": {0: "N"}}, opset_version=17)
    return path


def quantize_onnx_int8(fp32: Path, calib: np.ndarray, path: Path) -> Path:
    """ORT's own static quantization: QDQ, per-channel symmetric s8 weights, u8 activations (fast path)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"pixels": calib[i:i + 32]} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return path


def compile_tvm_fp32(model: Any, shape: tuple[int, ...], path: Path) -> Path:
    import torch
    import tvm
    from tvm.relax.frontend.torch import from_exported_program

    from lower.targets import make_target

    x = torch.zeros((2, *shape), dtype=torch.uint8)
    ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("n", min=1, max=1 << 16)}})
    tvm.compile(from_exported_program(ep), target=make_target("llvm")).export_library(str(path))
    return path


def calibration_images(data_dir: str | None, n: int, shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
    from train.data import load_split, subset
    from train.models.registry import data_dir_from_env

    root = Path(data_dir) if data_dir else data_dir_from_env()
    if root is not None and (root / "cifar10").is_dir() and tuple(shape) == (32, 32, 3):
        x, y = load_split(root, "cifar10", "test")
        return subset(x, y, n, 0)[0], f"{n} CIFAR-10 test images ({root})"
    return (np.random.default_rng(1).integers(0, 256, (n, *shape), dtype=np.uint8),
            f"{n} random uint8 images (no CIFAR-10 data found)")


def prepare(plan: dict[str, Any], workdir: Path, data_dir: str | None, calib_n: int) -> None:
    """Export/quantize/compile the teacher's files for the requested FP engines; failures -> unavailable."""
    wanted, bad = set(plan["engines"]), plan["unavailable"]
    shape = tuple(plan["input_shape"])
    calib, plan["calibration"] = calibration_images(data_dir, calib_n, shape)
    np.save(workdir / "calib.npy", calib)
    try:
        model = teacher_of(plan)
    except Exception as e:  # noqa: BLE001 - any failure makes the FP engines unavailable, not the run
        for k in wanted.intersection(FP_ENGINES):
            bad[k] = f"teacher: {first_line(e)}"
        return
    steps = [(("ort_fp32", "ort_int8"), "onnx_fp32", lambda p: export_onnx_fp32(model, shape, p), "teacher_fp32.onnx"),
             (("ort_int8",), "onnx_int8", lambda p: quantize_onnx_int8(workdir / "teacher_fp32.onnx", calib, p),
              "teacher_int8_qdq.onnx"),
             (("tvm_fp32",), "tvm_fp32", lambda p: compile_tvm_fp32(model, shape, p), "teacher_fp32_tvm.so")]
    for users, key, make, name in steps:
        users = [e for e in users if e in wanted and e not in bad]  # an engine whose input failed is skipped
        if not users:
            continue
        t0 = time.perf_counter()
        try:
            plan["files"][key] = str(make(workdir / name))
            log(f"prepared {name} ({time.perf_counter() - t0:.1f} s)")
        except Exception as e:  # noqa: BLE001
            for engine in users:
                bad[engine] = f"{name}: {first_line(e)}"
            log(f"{', '.join(users)} unavailable: {first_line(e)}")


# -- engines, built inside a worker (one thread count) ------------------------------------------------------
Runner = Callable[[np.ndarray], np.ndarray]


def _ort_runner(path: str, threads: int, spin: bool = False) -> Runner:
    from lower.onnx_export import inference_session

    session = inference_session(path, threads, spin)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _torch_fp32(plan: dict[str, Any], threads: int) -> Runner:
    import torch

    model = teacher_of(plan)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run


def _torch_int8(plan: dict[str, Any], threads: int) -> Runner:
    """PT2E: export, X86InductorQuantizer (u8 activations, per-channel s8 weights), calibrate, convert,
    torch.compile with freezing; Inductor compiles (tens of seconds) at the first call of each batch size."""
    import torch
    import torch._inductor.config as inductor
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    model = teacher_of(plan)
    calib = np.load(plan["files"]["calib"])
    x = torch.from_numpy(calib[:2])
    with torch.no_grad():
        batch_dim = {"x": {0: torch.export.Dim("n", min=1, max=1 << 16)}}
        exported = torch.export.export(model, (x,), dynamic_shapes=batch_dim)
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported.module(), quantizer)
        for i in range(0, len(calib), 64):
            prepared(torch.from_numpy(calib[i:i + 64]))
        converted = convert_pt2e(prepared)
    inductor.freezing = True
    inductor.cpp.threads = threads
    compiled = torch.compile(converted, dynamic=False)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return compiled(torch.from_numpy(x)).numpy()

    return run


def _tvm_fp32(plan: dict[str, Any], threads: int) -> Runner:
    import tvm

    vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(plan["files"]["tvm_fp32"]), tvm.cpu())

    def run(x: np.ndarray) -> np.ndarray:
        out = vm["main"](tvm.runtime.tensor(x))
        return (out if hasattr(out, "numpy") else out[0]).numpy()

    return run


def _tvm_int(path: str) -> Callable[[dict[str, Any], int], Runner]:
    def build(plan: dict[str, Any], threads: int) -> Runner:
        from .model import load

        model = load(path)
        executable, params = model.executable, model.params
        return lambda x: executable(x, params)

    return build


def engine_builders(plan: dict[str, Any]) -> dict[str, Callable[[dict[str, Any], int], Runner]]:
    files = plan["files"]
    table: dict[str, Callable[[dict[str, Any], int], Runner]] = {
        "torch_fp32": _torch_fp32,
        "torch_int8": _torch_int8,
        "ort_fp32": lambda p, t: _ort_runner(files["onnx_fp32"], t, p["spin"]),
        "ort_int8": lambda p, t: _ort_runner(files["onnx_int8"], t, p["spin"]),
        "tvm_fp32": _tvm_fp32,
    }
    for name, art in plan["artifacts"].items():
        table[f"tvm_{name}"] = _tvm_int(art["path"])
        if art["onnx"]:
            table[f"ort_dfqf_{name}"] = (lambda path: lambda p, t: _ort_runner(path, t, p["spin"]))(
                str(Path(art["path"]) / ONNX))
    return table


def time_engines(runners: dict[str, Runner], x: np.ndarray, repeat: int, warmup: int,
                 budget: float) -> dict[str, dict[str, Any]]:
    """Warm up, then time every engine once per round in rotating order; an engine leaves the rounds once it
    has MIN_TIMED samples and has used `budget` seconds. Returns per engine its samples and first output."""
    state: dict[str, dict[str, Any]] = {}
    for name, run in runners.items():
        t0 = time.perf_counter()
        try:
            out = run(x)  # torch.compile and ORT/TVM lazy initialization happen here
            first = time.perf_counter() - t0
            if warmup > 1:  # a second call shows the steady speed; slow engines skip the other warm-ups
                t1 = time.perf_counter()
                run(x)
                for _ in range(warmup - 2 if time.perf_counter() - t1 < budget / 20 else 0):
                    run(x)
            state[name] = {"samples": [], "output": np.asarray(out), "first_call_s": first}
        except Exception as e:  # noqa: BLE001
            state[name] = {"error": first_line(e)}
            log(f"{name} failed: {state[name]['error']}")
    active = [n for n in runners if "error" not in state[n]]
    for r in range(repeat):
        if not active:
            break
        for name in active[r % len(active):] + active[:r % len(active)]:
            t0 = time.perf_counter()
            try:
                runners[name](x)
            except Exception as e:  # noqa: BLE001
                state[name] = {"error": first_line(e)}
                continue
            state[name]["samples"].append(time.perf_counter() - t0)
        active = [n for n in active if "error" not in state[n]
                  and (len(state[n]["samples"]) < MIN_TIMED or sum(state[n]["samples"]) < budget)]
    return state


def run_worker(plan: dict[str, Any], threads: int, out: Path) -> None:
    """One thread count: build the engines, then time them for every batch size; rows appended to `out`."""
    import torch

    torch.set_num_threads(threads)
    builders = engine_builders(plan)
    runners: dict[str, Runner] = {}
    rows = []
    for name in plan["engines"]:
        if name in plan["unavailable"]:
            continue
        t0 = time.perf_counter()
        try:
            runners[name] = builders[name](plan, threads)
            log(f"threads={threads}: {name} ready ({time.perf_counter() - t0:.1f} s)")
        except Exception as e:  # noqa: BLE001
            rows += [{"engine": name, "batch": b, "threads": threads, "status": "unavailable", "reason": first_line(e)}
                     for b in plan["batch"]]
            log(f"threads={threads}: {name} unavailable: {first_line(e)}")
    shape = tuple(plan["input_shape"])
    for batch in plan["batch"]:
        x = np.random.default_rng(batch).integers(0, 256, (batch, *shape), dtype=np.uint8)
        t0 = time.perf_counter()
        state = time_engines(runners, x, plan["repeat"], plan["warmup"], plan["budget"])
        ref = state.get("torch_fp32", {}).get("output")
        for name, s in state.items():
            row: dict[str, Any] = {"engine": name, "batch": batch, "threads": threads}
            if "error" in s:
                rows.append({**row, "status": "failed", "reason": s["error"]})
                continue
            ms = 1e3 * np.asarray(s["samples"])
            agree = None
            if ref is not None and s["output"].shape == ref.shape:
                agree = round(float((s["output"].argmax(1) == ref.argmax(1)).mean()), 4)
            rows.append({**row, "status": "ok", "ms": round(float(np.median(ms)), 4),
                         "min_ms": round(float(ms.min()), 4),
                         "timed_calls": len(ms), "first_call_s": round(s["first_call_s"], 3), "agree_fp32": agree})
        log(f"threads={threads} batch={batch}: " + ", ".join(
            f"{r['engine']} {r['ms']:.3f} ms" for r in rows if r.get("batch") == batch and r["status"] == "ok")
            + f" ({time.perf_counter() - t0:.0f} s)")
        out.write_text(json.dumps(rows))


# -- the parent: plan, prepare, one worker per thread count, summary ----------------------------------------
def artifact_entry(path: Path) -> tuple[str, dict[str, Any], IntGraph, dict[str, Any]]:
    manifest = read_manifest(path)
    graph = load_graph(path)
    bits = int(manifest.get("student", {}).get("quant_config", {}).get("wbits", 8))
    return f"int{bits}", {"path": str(path.resolve()), "onnx": ONNX in manifest["files"], "bits": bits}, graph, manifest


def summarize(rows: list[dict[str, Any]], macs: int, peak_gmacs: float | None, int_engines: set[str]) -> None:
    """Add images/s, speedup over REFERENCE, and (integer engines) GOP/s and fraction of the VNNI peak."""
    ref = {(r["batch"], r["threads"]): r["ms"] for r in rows if r["engine"] == REFERENCE and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        r["images_per_s"] = round(1e3 * r["batch"] / r["ms"], 1)
        base = ref.get((r["batch"], r["threads"]))
        r["speedup_vs_ort_int8"] = round(base / r["ms"], 3) if base else None
        if r["engine"] in int_engines:
            r["gops"] = round(2 * macs * r["batch"] / (r["ms"] / 1e3) / 1e9, 2)
            r["vnni_peak_fraction"] = (round(r["gops"] / (2 * peak_gmacs * r["threads"]), 4) if peak_gmacs else None)


def measure_vnni_peak() -> tuple[float | None, str]:
    try:
        from benchmarks.vnni_peak import measure_peak

        return float(measure_peak()["gmacs"]), "measured (benchmarks.vnni_peak)"
    except Exception as e:  # noqa: BLE001 - no gcc, no VNNI: GOP/s is still reported
        return None, f"unavailable: {first_line(e)}"


def bench(artifact: Path, batch: list[int], threads: list[int], engines: list[str] | None = None,
          artifact_int4: Path | None = None, teacher: Path | None = None, student: Path | None = None,
          repeat: int = 50, warmup: int = 5, budget: float = 20.0, data_dir: str | None = None, calib_n: int = 256,
          vnni_peak_gmacs: float | None = None, spin: bool = False) -> dict[str, Any]:
    from train.student import read_student

    name, entry, graph, manifest = artifact_entry(artifact)
    artifacts = {name: entry}
    if artifact_int4 is not None:
        name4, entry4, _, _ = artifact_entry(artifact_int4)
        artifacts[name4 if name4 not in artifacts else f"{name4}b"] = entry4
    student = student or Path(manifest["student"]["path"])
    if not student.is_file():
        raise DFQFError(f"the student {student} recorded in {artifact}/manifest.json is not here: pass --student")
    ckpt = read_student(student)
    teacher_path = teacher or ckpt.get("meta", {}).get("teacher")
    if teacher_path and not Path(teacher_path).is_file():
        raise DFQFError(f"teacher weights not found: {teacher_path} (pass --teacher)")
    teacher_path = Path(teacher_path).resolve() if teacher_path else None
    known = (list(FP_ENGINES) + [f"tvm_{n}" for n in artifacts]
             + [f"ort_dfqf_{n}" for n, a in artifacts.items() if a["onnx"]])
    engines = engines or known
    unknown = [e for e in engines if e not in known]
    if unknown:
        raise DFQFError(f"unknown engine(s) {', '.join(unknown)}; available for this artifact: {', '.join(known)}")
    h, w, c = graph.input_shape
    plan: dict[str, Any] = {
        "arch": ckpt["arch"], "arch_kwargs": ckpt.get("arch_kwargs", {}), "teacher": str(teacher_path or ""),
        "mean": list(ckpt["input"]["mean"]), "std": list(ckpt["input"]["std"]), "input_shape": [h, w, c],
        "engines": engines, "artifacts": artifacts, "batch": batch, "repeat": repeat, "warmup": warmup,
        "budget": budget, "spin": spin, "files": {}, "unavailable": {}, "calibration": None}
    if vnni_peak_gmacs is None:
        vnni_peak_gmacs, peak_source = measure_vnni_peak()
    else:
        peak_source = "given (--vnni-peak)"
    log(f"VNNI peak {vnni_peak_gmacs} GMAC/s per core ({peak_source})")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dfqf-bench-") as tmp:
        workdir = Path(tmp)
        prepare(plan, workdir, data_dir, calib_n)
        plan["files"]["calib"] = str(workdir / "calib.npy")
        if "torch_int8" in engines:
            try:
                import torchao  # noqa: F401 - only to say why the engine is missing
            except ImportError as e:
                plan["unavailable"]["torch_int8"] = f"torchao is not installed ({first_line(e)}); pip install torchao"
        (workdir / "plan.json").write_text(json.dumps(plan))
        for t in threads:
            out = workdir / f"rows_{t}.json"
            env = {**os.environ, **{k: str(t) for k in THREAD_ENV}, **({} if spin else NO_SPIN_ENV)}
            log(f"threads={t}: worker starting")
            proc = subprocess.run([sys.executable, "-m", "runtime.bench", "--worker", str(workdir / "plan.json"),
                                   "--threads", str(t), "--worker-out", str(out)], env=env, cwd=REPO)
            done = json.loads(out.read_text()) if out.is_file() else []
            if proc.returncode != 0:
                log(f"threads={t}: worker exited with code {proc.returncode}")
                measured = {(r["engine"], r.get("batch")) for r in done}
                done += [{"engine": e, "batch": b, "threads": t, "status": "failed",
                          "reason": f"worker process exited with code {proc.returncode}"}
                         for e in engines if e not in plan["unavailable"] for b in batch if (e, b) not in measured]
            rows += done
    for e, reason in plan["unavailable"].items():
        rows += [{"engine": e, "batch": b, "threads": t, "status": "unavailable", "reason": reason}
                 for t in threads for b in batch]
    macs = graph_macs(graph)
    int_engines = {"torch_int8", "ort_int8", *(f"{p}_{n}" for n in artifacts for p in ("tvm", "ort_dfqf"))}
    summarize(rows, macs, vnni_peak_gmacs, int_engines)
    first = {r["engine"]: r for r in rows if r.get("batch") == batch[0] and r["threads"] == threads[0]}
    report: dict[str, Any] = {f"{e}_ms": first.get(e, {}).get("ms") for e in
                              ["tvm_int8", "ort_int8", "torch_int8", "ort_fp32", "torch_fp32", *engines]}
    report.update({
        "artifact": str(artifact), "artifacts": artifacts, "arch": plan["arch"], "teacher": plan["teacher"],
        "batch": batch, "threads": threads, "engines": engines, "repeat": repeat, "warmup": warmup,
        "budget_s": budget, "min_timed_calls": MIN_TIMED,
        "idle_threads_spin": spin, "macs_per_image": macs,
        "vnni_peak_gmacs_per_core": vnni_peak_gmacs, "vnni_peak_source": peak_source,
        "ort_int8_calibration": plan["calibration"], "target": manifest.get("target_dict"),
        "unavailable": dict(plan["unavailable"]) | {r["engine"]: r["reason"] for r in rows if r["status"] != "ok"},
        "results": rows})
    return report


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = CLIParser(prog="python -m runtime.bench", description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path, nargs="?", help="artifact folder from lower.compile")
    p.add_argument("--batch", type=int_list, default=[1, 128], help="batch sizes, e.g. 1,128")
    p.add_argument("--threads", type=int_list, default=[1], help="thread counts, e.g. 1,2")
    p.add_argument("--repeat", type=positive_int, default=50, help="timed rounds per configuration")
    p.add_argument("--warmup", type=positive_int, default=5,
                   help="untimed calls first (2 for engines slower than budget/20 per call)")
    p.add_argument("--budget", type=float, default=20.0,
                   help=f"seconds per engine and configuration after which it stops (after {MIN_TIMED} calls)")
    p.add_argument("--engines", type=lambda s: [e for e in s.split(",") if e], help="comma-separated subset")
    p.add_argument("--artifact-int4", type=Path, help="a second artifact (e.g. W4A4) timed as tvm_int4")
    p.add_argument("--teacher", type=Path, help="FP teacher weights (default: the student's meta.teacher)")
    p.add_argument("--student", type=Path, help="student.pt (default: the one in the artifact's manifest)")
    p.add_argument("--data-dir", help="CIFAR-10 for calibrating the peers' int8 (default $DFQF_DATA_DIR; "
                                      "else random images)")
    p.add_argument("--calib-images", type=positive_int, default=256)
    p.add_argument("--vnni-peak", type=float, help="VNNI peak GMAC/s per core (default: measure it)")
    p.add_argument("--spin", action="store_true",
                   help="let idle pool threads spin-wait (engine defaults); off: they sleep, so one engine's pool "
                        "does not steal the cores the next one is timed on")
    p.add_argument("--json-out", type=Path, help="also write the JSON report here")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        run_worker(json.loads(args.worker.read_text()), args.threads[0], args.worker_out)
        return 0
    if args.artifact is None:
        raise DFQFError("an ARTIFACT folder is required")
    if not args.artifact.is_dir():
        raise DFQFError(f"artifact folder not found: {args.artifact}")
    if args.artifact_int4 is not None and not args.artifact_int4.is_dir():
        raise DFQFError(f"artifact folder not found: {args.artifact_int4}")
    if args.budget <= 0:
        raise DFQFError(f"--budget must be positive, got {args.budget}")
    report = bench(args.artifact, args.batch, args.threads, args.engines, args.artifact_int4, args.teacher,
                   args.student, args.repeat, args.warmup, args.budget, args.data_dir, args.calib_images,
                   args.vnni_peak, args.spin)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
