"""Speed table: the compiled integer ResNet20 (W8A8 and W4A4) against torch, ONNX Runtime and TVM fp32.

    python -m benchmarks.speed_table [--student-int8 S] [--student-int4 S] [--batch 1,128] [--threads 1,2]
                                     [--repeat 100] [--budget 15] [--rebuild] [--out benchmarks/results]

Builds the llvm artifacts it needs with `lower.compile` (reused when present and made from the same
student; `--rebuild` recompiles them with the current lowering), creates the W8A8 DFQ student with
`python -m train.ptq` when it is missing, measures this core's VNNI peak (`benchmarks.vnni_peak`), runs
`python -m benchmarks.bench` once for every batch size and thread count (engines interleaved in one process
per thread count), and writes speed_table.md, speed_table.json and speed_table.png to --out.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.cli import check_fields, cli_main, each, int_list, option, parse_options, positive
from core.errors import DFQFError
from core.files import write_json_atomic

from .environment import environment
from .vnni_peak import measure_peak

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
TEACHER = "teachers/resnet20_cifar10_jpeg.pt"
PEERS = ("torch_fp32", "torch_int8", "ort_fp32", "ort_int8")  # what the integer graph must beat
GOAL = 1.5  # issue goal: tvm_int8 at least this many times faster than the best peer
LABELS = {"torch_fp32": "torch fp32 eager", "torch_int8": "torch int8 PT2E (X86InductorQuantizer, compile)",
          "ort_fp32": "ONNX Runtime fp32", "ort_int8": "ONNX Runtime int8 QDQ (quantize_static)",
          "tvm_fp32": "TVM fp32 (default llvm pipeline)", "tvm_int8": "**TVM int8 (DFQF artifact, W8A8)**",
          "tvm_int4": "**TVM int4 (DFQF artifact, W4A4)**", "ort_dfqf_int8": "ORT on the DFQF W8A8 QDQ export",
          "ort_dfqf_int4": "ORT on the DFQF W4A4 QDQ export"}


def log(msg: str) -> None:
    print(f"[speed_table] {msg}", file=sys.stderr, flush=True)


def run_module(module: str, args: list[str]) -> str:
    """`python -m module args` from the repo root; stderr passes through; returns stdout."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise DFQFError(f"python -m {module} {' '.join(args)} exited with code {proc.returncode}")
    return proc.stdout


def ensure_student_int8(path: Path, data_dir: Path) -> Path:
    if not path.is_file():
        log(f"{path} missing: making it with train.ptq (DFQ, W8A8)")
        run_module("train.ptq", ["--method", "dfq", "--wbits", "8", "--abits", "8", "--weights",
                                 str(data_dir / TEACHER), "--out", str(path.parent)])
    return path


def find_artifact(student: Path, root: Path) -> Path | None:
    """The newest llvm artifact under root/*/llvm compiled from this very student file (same sha256)."""
    from core.files import sha256_file

    digest, found = sha256_file(student), []
    for manifest in root.glob("*/llvm/manifest.json"):
        try:
            m = json.loads(manifest.read_text())
            if m["student"]["sha256"] == digest:
                found.append((m.get("created", ""), manifest.parent))
        except (ValueError, KeyError, OSError):
            continue
    return max(found)[1] if found else None


def bit_exact(artifact: Path, n: int = 4) -> bool:
    """Whether the compiled module equals the NumPy reference on n random images (a fresh build of a
    lowering that is being changed must still compute the integer graph)."""
    import numpy as np

    from lower.reference import run_graph
    from runtime import load

    model = load(artifact)
    x = np.random.default_rng(0).integers(0, 256, (n, *model.graph.input_shape), dtype=np.uint8)
    return bool(np.array_equal(model.predict_int(x), run_graph(model.graph, x)))


def ensure_artifact(student: Path, root: Path, rebuild: bool, notes: list[str]) -> Path:
    """An llvm artifact of `student`: an existing one made from this very file under `root` or `artifacts/`,
    else (or with rebuild) compiled now to root/<student folder>/llvm and checked bit-exact; a rebuild that
    fails falls back to an existing artifact, with a note."""
    existing = find_artifact(student, root) or find_artifact(student, Path("artifacts"))
    if existing is not None and not rebuild:
        log(f"reusing {existing} (compiled from {student})")
        return existing
    out = root / student.resolve().parent.name / "llvm"
    log(f"compiling {student} -> {out}")
    try:
        run_module("lower.compile", [str(student), "--target", "llvm", "--out", str(out), "--force"])
        if not bit_exact(out):
            raise DFQFError(f"{out}: the compiled module differs from the NumPy reference")
        return out
    except DFQFError as e:
        if existing is None:
            raise
        notes.append(f"compiling {student} failed ({e}); used the existing {existing}")
        log(notes[-1])
        return existing


def snapshot(artifact: Path, into: Path) -> Path:
    """A private copy, so that a recompilation of the shared artifact during the run cannot change it."""
    dest = into / artifact.parent.name
    shutil.copytree(artifact, dest)
    return dest


def goal_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per batch/threads: the best peer and how tvm_int8/tvm_int4 compare with it (speedup > 1 = faster)."""
    ok = [r for r in results if r["status"] == "ok"]
    out = []
    for b, t in sorted({(r["batch"], r["threads"]) for r in ok}):
        row: dict[str, Any] = {"batch": b, "threads": t}
        for stat, suffix in (("ms", ""), ("min_ms", "_min")):
            here = {r["engine"]: r[stat] for r in ok if (r["batch"], r["threads"]) == (b, t)}
            peers = {e: ms for e, ms in here.items() if e in PEERS}
            if not peers:
                continue
            best = min(peers, key=peers.get)
            row.update({f"best_peer{suffix}": best, f"best_peer{suffix}_ms": peers[best]})
            for e in ("tvm_int8", "tvm_int4"):
                if e in here:
                    row[f"{e}{suffix}_speedup_vs_best_peer"] = round(peers[best] / here[e], 3)
        if "best_peer" not in row:
            continue
        out.append(row)
    return out


def markdown(report: dict[str, Any], env: dict[str, Any], peak: dict[str, Any], seconds: float) -> str:
    res, batches, threads = report["results"], report["batch"], report["threads"]
    configs = [(b, t) for b in batches for t in threads]
    engines = list(dict.fromkeys(r["engine"] for r in res))
    cell = {(r["engine"], r["batch"], r["threads"]): r for r in res}
    lines = [
        f"# Speed table: {report['arch']} CIFAR-10, integer graph vs peers",
        "",
        f"- date: {env['date']}; command: `{env['command']}` ({seconds / 60:.1f} min in all)",
        f"- machine: {env['cpu']}, {env['cores']} cores shared with other jobs (timings are noisy: medians of "
        f"interleaved rounds), Python {env['python']}, torch {env['torch']}",
        f"- TVM target: `{json.dumps(report['target'])}`; artifacts: "
        + ", ".join(f"{k}: `{v['path']}` (compiled {v.get('created')}, benchmarked from a private copy)"
                    for k, v in report["artifacts"].items()),
        f"- teacher (FP engines): `{report['teacher']}`; all engines take the same random uint8 NHWC images "
        "(FP engines normalize inside the model)",
        f"- ORT int8 / torch int8 calibration: {report['ort_int8_calibration']}",
        f"- repeats: up to {report['repeat']} interleaved rounds after {report['warmup']} warm-up calls; an engine "
        f"stops after {report['budget_s']:.0f} s per configuration (at least {report['min_timed_calls']} calls); "
        "the calls actually timed are in the JSON (`timed_calls`) and in brackets below",
        f"- VNNI peak (u8×s8 vpdpbusd, one core): **{peak['gmacs']} GMAC/s** ({peak['gops']} GOP/s; "
        f"{peak['vpdpbusd_zmm_per_cycle']} vpdpbusd zmm per cycle at ~{peak['ghz']} GHz); {report['arch']} = "
        f"{report['macs_per_image'] / 1e6:.2f} MMAC/image",
        "",
        f"- load average (1 min) of this 2-core machine: {report['load_before']:.1f} at the start, "
        f"{report['load_after']:.1f} at the end. Other jobs share the cores, so calls get preempted and a "
        "median includes those waits; the minimum is the closer estimate of an engine's own speed, the median "
        "of what a user of this busy machine sees",
        "",
        "Latency in ms, median / min [timed calls] (median speedup vs ORT int8: >1 is faster):",
        "",
        "| engine | " + " | ".join(f"batch {b}, {t} thr" for b, t in configs) + " |",
        "|---|" + "---:|" * len(configs),
    ]
    for e in engines:
        cells = []
        for b, t in configs:
            r = cell.get((e, b, t))
            if r is None or r["status"] != "ok":
                cells.append("n/a" if r is None else r["status"])
            else:
                sp = f" ({r['speedup_vs_ort_int8']:.2f}×)" if r.get("speedup_vs_ort_int8") else ""
                cells.append(f"{r['ms']:.3f} / {r['min_ms']:.3f} [{r['timed_calls']}]{sp}")
        lines.append(f"| {LABELS.get(e, e)} | " + " | ".join(cells) + " |")
    limit = [f"{report['macs_per_image'] * b / (peak['gmacs'] * 1e9 * t) * 1e3:.3f}" for b, t in configs]
    lines.append("| limit: VNNI peak × threads | " + " | ".join(limit) + " |")
    lines += ["", "Integer engines: achieved GOP/s (2 × MACs) and fraction of the VNNI peak × threads:", "",
              "| engine | " + " | ".join(f"batch {b}, {t} thr" for b, t in configs) + " |",
              "|---|" + "---:|" * len(configs)]
    for e in engines:
        rs = [cell.get((e, b, t)) for b, t in configs]
        if not any(r and r.get("gops") for r in rs):
            continue
        lines.append(f"| {LABELS.get(e, e)} | " + " | ".join(
            f"{r['gops']:.1f} ({100 * r['vnni_peak_fraction']:.1f} %)" if r and r.get("gops") else "–"
            for r in rs) + " |")
    lines += ["", f"Goal (issue): TVM int8 ≥ {GOAL}× faster than the best peer ({', '.join(PEERS)}), by median and "
              "by min:", "",
              "| batch | threads | best peer (median) | its ms | TVM int8 | TVM int4 | best peer (min) | its ms | "
              "TVM int8 | TVM int4 | goal met |", "|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---|"]
    fmt = lambda v: "–" if v is None else f"{v:.2f}×"  # noqa: E731
    for g in report["goal"]:
        s8, m8 = g.get("tvm_int8_speedup_vs_best_peer"), g.get("tvm_int8_min_speedup_vs_best_peer")
        lines.append(f"| {g['batch']} | {g['threads']} | {g['best_peer']} | {g['best_peer_ms']:.3f} | {fmt(s8)} | "
                     f"{fmt(g.get('tvm_int4_speedup_vs_best_peer'))} | {g['best_peer_min']} | "
                     f"{g['best_peer_min_ms']:.3f} | "
                     f"{fmt(m8)} | {fmt(g.get('tvm_int4_min_speedup_vs_best_peer'))} | "
                     f"{'yes' if s8 and m8 and min(s8, m8) >= GOAL else 'no'} |")
    bad = report.get("unavailable") or {}
    lines += [f"- {n}" for n in report.get("notes", [])]
    lines += ["", "Unavailable engines: " + ("; ".join(f"{e}: {why}" for e, why in bad.items()) if bad else "none"), ""]
    return "\n".join(lines)


def bar_chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    res = [r for r in report["results"] if r["status"] == "ok"]
    configs = [(b, t) for b in report["batch"] for t in report["threads"]]
    engines = list(dict.fromkeys(r["engine"] for r in res))
    ms = {(r["engine"], r["batch"], r["threads"]): r["ms"] for r in res}
    mins = {(r["engine"], r["batch"], r["threads"]): r["min_ms"] for r in res}
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / max(len(engines), 1)
    x = np.arange(len(configs))
    for i, e in enumerate(engines):
        vals = [ms.get((e, b, t), np.nan) for b, t in configs]
        pos = x + (i - (len(engines) - 1) / 2) * width
        ax.bar(pos, vals, width, label=e, edgecolor="black" if e.startswith("tvm_int") else None)
        ax.scatter(pos, [mins.get((e, b, t), np.nan) for b, t in configs], marker="_", color="black", s=40, zorder=3)
    ax.set_xticks(x, [f"batch {b}\n{t} thread{'s' if t > 1 else ''}" for b, t in configs])
    ax.set_yscale("log")
    ax.set_ylabel("latency per batch (ms, log scale): bar median, tick min")
    ax.set_title(f"{report['arch']} CIFAR-10 on {report.get('cpu', 'this CPU')}: lower is better")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass(frozen=True)
class SpeedTableOptions:
    student_int8: Path = option(Path("runs/ptq/r20-dfq-w8a8/student.pt"), "the W8A8 student (made with train.ptq "
                                "DFQ when missing)")
    student_int4: str = option("runs/bench/w4a4/student.pt", "the W4A4 student, or 'none' to skip it")
    artifact_root: Path = option(Path("artifacts"), "artifacts go to ROOT/<student folder>/llvm")
    data_dir: Path = option(Path(os.environ.get("DFQF_DATA_DIR") or DEFAULT_DATA), "data folder (teacher, "
                            "calibration images of the peers)")
    batch: list[int] = option([1, 128], "batch sizes", parse=int_list, check=each(positive))
    threads: list[int] = option([1, 2], "thread counts", parse=int_list, check=each(positive))
    repeat: int = option(100, "timed rounds per configuration", check=positive)
    warmup: int = option(5, "untimed calls first", check=positive)
    budget: float = option(15.0, "seconds per engine and configuration", check=positive)
    engines: str | None = option(None, "comma-separated subset (benchmarks.bench names)")
    rebuild: bool = option(False, "recompile the artifacts with the current lowering", switch=True)
    out: Path = option(Path("benchmarks/results"), "output folder")
    name: str = option("speed_table", "output file name stem (e.g. speed_table_resnet56)")
    from_json: Path | None = option(None, "only re-render the .md and .png from this speed_table JSON")

    def __post_init__(self) -> None:
        check_fields(self)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_options(SpeedTableOptions, argv, "python -m benchmarks.speed_table", __doc__.splitlines()[0])
    if args.from_json is not None:
        full = json.loads(args.from_json.read_text())
        stem = args.from_json.with_suffix("")
        stem.with_suffix(".md").write_text(markdown(full, full["environment"], full["vnni_peak"], full["seconds"]))
        bar_chart(full, stem.with_suffix(".png"))
        return 0
    t0 = time.perf_counter()
    env = environment("benchmarks.speed_table", argv)
    s8 = ensure_student_int8(args.student_int8, args.data_dir)
    notes: list[str] = []
    a8 = ensure_artifact(s8, args.artifact_root, args.rebuild, notes)
    a4 = None
    if str(args.student_int4) == "none":
        notes.append("tvm_int4: not requested (--student-int4 none)")
    elif Path(args.student_int4).is_file():
        try:
            a4 = ensure_artifact(Path(args.student_int4), args.artifact_root, args.rebuild, notes)
        except DFQFError as e:  # the table still has every other engine
            notes.append(f"tvm_int4: no artifact ({e})")
            log(notes[-1])
    else:
        notes.append(f"tvm_int4: no W4A4 student at {args.student_int4}")
        log(notes[-1])
    manifests = {str(a): json.loads((a / "manifest.json").read_text()) for a in (a8, a4) if a is not None}
    tmp = Path(tempfile.mkdtemp(prefix="dfqf-speed-"))
    a8_run, a4_run = snapshot(a8, tmp), (snapshot(a4, tmp) if a4 is not None else None)
    peak = measure_peak()
    log(f"VNNI peak {peak['gmacs']} GMAC/s")
    bench_args = [str(a8_run), "--batch", ",".join(map(str, args.batch)), "--threads", ",".join(map(str, args.threads)),
                  "--repeat", str(args.repeat), "--warmup", str(args.warmup), "--budget", str(args.budget),
                  "--vnni-peak", str(peak["gmacs"]), "--data-dir", str(args.data_dir)]
    if a4 is not None:
        bench_args += ["--artifact-int4", str(a4_run)]
    if args.engines:
        bench_args += ["--engines", args.engines]
    load_before = os.getloadavg()[0]
    try:
        report = json.loads(run_module("benchmarks.bench", bench_args).strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # name the shared artifacts (not the private copies) in the report
    for entry in report["artifacts"].values():
        src = a8 if Path(entry["path"]).resolve() == a8_run.resolve() else a4
        entry.update(path=str(src), created=manifests[str(src)].get("created"),
                     model_so_sha256=manifests[str(src)]["files"]["model.so"]["sha256"])
    report["artifact"] = str(a8)
    report["load_before"], report["load_after"] = round(load_before, 2), round(os.getloadavg()[0], 2)
    report["notes"] = notes
    report["cpu"] = env["cpu"]
    report["goal"] = goal_rows(report["results"])
    seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    full = {"environment": env, "bench_command": "python -m benchmarks.bench " + " ".join(bench_args),
            "vnni_peak": peak, "goal_speedup": GOAL, "seconds": round(seconds, 1), **report}
    write_json_atomic(full, args.out / f"{args.name}.json")
    (args.out / f"{args.name}.md").write_text(markdown(report, env, peak, seconds))
    bar_chart(report, args.out / f"{args.name}.png")
    log(f"wrote {args.out}/{args.name}.{{md,json,png}} ({seconds / 60:.1f} min)")
    print(json.dumps({"goal": report["goal"], "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
