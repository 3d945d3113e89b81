"""`python -m benchmarks.bench ARTIFACT [--batch 1,128] [--threads 1,2]`: latency of the integer model next to
its peers (`benchmarks.engines`), on the same random uint8 images.

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

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.cli import (
    check_fields,
    check_report_path,
    cli_main,
    distinct,
    each,
    emit_report,
    int_list,
    option,
    parse_options,
    positive,
    str_list,
)
from core.errors import DFQFError, first_line
from lower.artifact import ONNX_FILES, load_graph, read_manifest
from lower.graph import IntGraph

from .engines import FP_ENGINES, Runner, engine_builders, ort_engine_name, prepare

REPO = Path(__file__).resolve().parents[1]
REFERENCE = "ort_int8"  # the speed every engine is compared with
MIN_TIMED = 3
THREAD_ENV = ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Idle pool threads of one engine must not spin on the cores the next engine in the round is timed on.
NO_SPIN_ENV = {"TVM_THREAD_POOL_SPIN_COUNT": "0", "OMP_WAIT_POLICY": "PASSIVE"}


def log(msg: str) -> None:
    print(f"[benchmarks.bench] {msg}", file=sys.stderr, flush=True)


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
    onnx = {v: str((path / f).resolve()) for v, f in ONNX_FILES.items() if f in manifest["files"]}
    return f"int{bits}", {"path": str(path.resolve()), "onnx": onnx, "bits": bits}, graph, manifest


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


@dataclass(frozen=True)
class BenchOptions:
    """What `bench` times (each field is also a flag of `python -m benchmarks.bench`)."""

    artifact: Path = option(help="artifact folder from lower.compile", positional=True)
    batch: list[int] = option([1, 128], "batch sizes, e.g. 1,128", parse=int_list, check=each(positive))
    threads: list[int] = option([1], "thread counts, e.g. 1,2", parse=int_list, check=each(positive))
    engines: list[str] | None = option(None, "comma-separated subset of the engines", parse=str_list, check=distinct)
    artifact_int4: Path | None = option(None, "a second artifact (e.g. W4A4) timed as tvm_int4")
    teacher: Path | None = option(None, "FP teacher weights (default: the student's meta.teacher)")
    student: Path | None = option(None, "student.pt (default: the one in the artifact's manifest)")
    repeat: int = option(50, "timed rounds per configuration", check=positive)
    warmup: int = option(5, "untimed calls first (2 for engines slower than budget/20 per call)", check=positive)
    budget: float = option(20.0, f"seconds per engine and configuration after which it stops (after {MIN_TIMED} "
                           "calls)", check=positive)
    data_dir: Path | None = option(None, "CIFAR-10 for calibrating the peers' int8 (default $DFQF_DATA_DIR; else "
                                   "random images)")
    calib_images: int = option(256, "calibration images of the peers' int8", check=positive)
    vnni_peak: float | None = option(None, "VNNI peak GMAC/s per core (default: measure it)", check=positive)
    spin: bool = option(False, "let idle pool threads spin-wait (engine defaults); off: they sleep, so one engine's "
                        "pool does not steal the cores the next one is timed on", switch=True)
    json_out: Path | None = option(None, "also write the JSON report here")

    def __post_init__(self) -> None:
        check_fields(self)
        distinct(self.batch)
        distinct(self.threads)


def bench(o: BenchOptions) -> dict[str, Any]:
    from train.student import read_student

    for path in (o.artifact, o.artifact_int4):
        if path is not None and not path.is_dir():
            raise DFQFError(f"artifact folder not found: {path}")
    name, entry, graph, manifest = artifact_entry(o.artifact)
    artifacts = {name: entry}
    if o.artifact_int4 is not None:
        name4, entry4, _, _ = artifact_entry(o.artifact_int4)
        artifacts[name4 if name4 not in artifacts else f"{name4}b"] = entry4
    student = o.student or Path(manifest["student"]["path"])
    if not student.is_file():
        raise DFQFError(f"the student {student} recorded in {o.artifact}/manifest.json is not here: pass --student")
    ckpt = read_student(student)
    teacher_path = o.teacher or ckpt.get("meta", {}).get("teacher")
    if teacher_path and not Path(teacher_path).is_file():
        raise DFQFError(f"teacher weights not found: {teacher_path} (pass --teacher)")
    teacher_path = Path(teacher_path).resolve() if teacher_path else None
    known = (list(FP_ENGINES) + [f"tvm_{n}" for n in artifacts]
             + [ort_engine_name(v, n) for n, a in artifacts.items() for v in a["onnx"]])
    engines = o.engines or known
    unknown = [e for e in engines if e not in known]
    if unknown:
        raise DFQFError(f"unknown engine(s) {', '.join(unknown)}; available for this artifact: {', '.join(known)}")
    h, w, c = graph.input_shape
    plan: dict[str, Any] = {
        "arch": ckpt["arch"], "arch_kwargs": ckpt.get("arch_kwargs", {}), "teacher": str(teacher_path or ""),
        "student": str(student.resolve()),
        "mean": list(ckpt["input"]["mean"]), "std": list(ckpt["input"]["std"]), "input_shape": [h, w, c],
        "engines": engines, "artifacts": artifacts, "batch": o.batch, "repeat": o.repeat, "warmup": o.warmup,
        "budget": o.budget, "spin": o.spin, "files": {}, "unavailable": {}, "calibration": None}
    vnni_peak_gmacs = o.vnni_peak
    if vnni_peak_gmacs is None:
        vnni_peak_gmacs, peak_source = measure_vnni_peak()
    else:
        peak_source = "given (--vnni-peak)"
    log(f"VNNI peak {vnni_peak_gmacs} GMAC/s per core ({peak_source})")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dfqf-bench-") as tmp:
        workdir = Path(tmp)
        prepare(plan, workdir, None if o.data_dir is None else str(o.data_dir), o.calib_images)
        plan["files"]["calib"] = str(workdir / "calib.npy")
        if "torch_int8" in engines:
            try:
                import torchao  # noqa: F401 - only to say why the engine is missing
            except ImportError as e:
                plan["unavailable"]["torch_int8"] = f"torchao is not installed ({first_line(e)}); pip install torchao"
        (workdir / "plan.json").write_text(json.dumps(plan))
        for t in o.threads:
            out = workdir / f"rows_{t}.json"
            env = {**os.environ, **{k: str(t) for k in THREAD_ENV}, **({} if o.spin else NO_SPIN_ENV)}
            log(f"threads={t}: worker starting")
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--worker", str(workdir / "plan.json"),
                                   str(t), str(out)], env=env, cwd=REPO)
            done = json.loads(out.read_text()) if out.is_file() else []
            if proc.returncode != 0:
                log(f"threads={t}: worker exited with code {proc.returncode}")
                measured = {(r["engine"], r.get("batch")) for r in done}
                done += [{"engine": e, "batch": b, "threads": t, "status": "failed",
                          "reason": f"worker process exited with code {proc.returncode}"}
                         for e in engines if e not in plan["unavailable"] for b in o.batch if (e, b) not in measured]
            rows += done
    for e, reason in plan["unavailable"].items():
        rows += [{"engine": e, "batch": b, "threads": t, "status": "unavailable", "reason": reason}
                 for t in o.threads for b in o.batch]
    macs = graph.total_macs()
    int_engines = {"torch_int8", "ort_int8", *(f"tvm_{n}" for n in artifacts),
                   *(ort_engine_name(v, n) for n, a in artifacts.items() for v in a["onnx"])}
    summarize(rows, macs, vnni_peak_gmacs, int_engines)
    first = {r["engine"]: r for r in rows if r.get("batch") == o.batch[0] and r["threads"] == o.threads[0]}
    report: dict[str, Any] = {f"{e}_ms": first.get(e, {}).get("ms") for e in
                              ["tvm_int8", "ort_int8", "torch_int8", "ort_fp32", "torch_fp32", *engines]}
    report.update({
        "artifact": str(o.artifact), "artifacts": artifacts, "arch": plan["arch"], "teacher": plan["teacher"],
        "batch": o.batch, "threads": o.threads, "engines": engines, "repeat": o.repeat, "warmup": o.warmup,
        "budget_s": o.budget, "min_timed_calls": MIN_TIMED,
        "idle_threads_spin": o.spin, "macs_per_image": macs,
        "vnni_peak_gmacs_per_core": vnni_peak_gmacs, "vnni_peak_source": peak_source,
        "ort_int8_calibration": plan["calibration"], "target": manifest.get("target_dict"),
        "unavailable": dict(plan["unavailable"]) | {r["engine"]: r["reason"] for r in rows if r["status"] != "ok"},
        "results": rows})
    return report


@cli_main
def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--worker"]:  # one thread count, in its own process (started by `bench`)
        plan, threads, out = argv[1], int(argv[2]), Path(argv[3])
        run_worker(json.loads(Path(plan).read_text()), threads, out)
        return 0
    o = parse_options(BenchOptions, argv, "python -m benchmarks.bench", __doc__.splitlines()[0])
    if o.json_out:
        check_report_path(o.json_out, "--json-out")
    emit_report(bench(o), o.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
