"""The ONNX exports on ONNX Runtime: our QDQ models against ORT's own `quantize_static` model of the teacher.

    python -m benchmarks.ort_table --student-int8 S8 [--student-int4 S4] [--batch 1,128] [--threads 1,2]
                                   [--data-dir D] [--work runs/ort_table] [--out benchmarks/results]

For each student, two artifacts (`lower.compile`, and `lower.compile --for-ort`), each with both ONNX
variants (exact, fast). `runtime.parity` on the data folder's CIFAR-10 test split gives each variant's top-1
agreement with its own artifact's integer graph and its largest per-layer code difference; one
`benchmarks.bench` run per student times ort_int8 (ORT's own model) next to every export, side by side.
Writes ort_table.json and ort_table.md to --out.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.cli import check_fields, cli_main, each, int_list, option, parse_options, positive
from core.errors import DFQFError
from core.files import write_json_atomic

from .environment import environment

REPO = Path(__file__).resolve().parents[1]
GOAL = 1.1  # issue 17: ort_dfqf_fast_int8 at most this many times ort_int8's latency
AGREEMENT_GOAL = 0.999


def log(msg: str) -> None:
    print(f"[ort_table] {msg}", file=sys.stderr, flush=True)


def run_module(module: str, args: list[str]) -> str:
    """`python -m module args` from the repo root; its last stdout line."""
    log(f"python -m {module} {' '.join(args)}")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise DFQFError(f"python -m {module} exited with code {proc.returncode}")
    return proc.stdout.strip().splitlines()[-1]


def run_report(module: str, args: list[str]) -> dict[str, Any]:
    """`run_module` for a command whose last stdout line is its JSON report."""
    return json.loads(run_module(module, args))


@dataclass(frozen=True)
class OrtTableOptions:
    student_int8: Path = option(help="the W8A8 student.pt")
    student_int4: Path | None = option(None, "a W4A4 student.pt (its ORT rows: 4-bit values on 8-bit kernels)")
    data_dir: Path = option(Path(os.environ.get("DFQF_DATA_DIR") or REPO.parent / "shared" / "data"),
                            "data folder (CIFAR-10 test split for parity, ORT's calibration images)")
    batch: list[int] = option([1, 128], "batch sizes", parse=int_list, check=each(positive))
    threads: list[int] = option([1, 2], "thread counts", parse=int_list, check=each(positive))
    budget: float = option(10.0, "seconds per engine and configuration", check=positive)
    work: Path = option(Path("runs/ort_table"), "where the artifacts and reports go")
    out: Path = option(Path("benchmarks/results"), "output folder of the table")

    def __post_init__(self) -> None:
        check_fields(self)


def build(student: Path, out: Path, for_ort: bool) -> Path:
    run_module("lower.compile", [str(student), "--out", str(out), "--force", *(["--for-ort"] if for_ort else [])])
    return out


def rows_for(name: str, student: Path, o: OrtTableOptions) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Parity of every (graph structure, ONNX variant) of `student`, and one bench run timing them all."""
    arts = {"default": build(student, o.work / name / "default", False),
            "ort": build(student, o.work / name / "ort", True)}
    parity = {k: run_report("runtime.parity", [str(a), "--data-dir", str(o.data_dir), "--json-out",
                                               str(a / "parity.json")]) for k, a in arts.items()}
    bench = run_report("benchmarks.bench", [
        str(arts["ort"]), "--artifact-int4", str(arts["default"]), "--engines", ",".join(engines(name)),
        "--batch", ",".join(map(str, o.batch)), "--threads", ",".join(map(str, o.threads)), "--budget",
        str(o.budget), "--data-dir", str(o.data_dir), "--json-out", str(o.work / name / "bench.json")])
    ms = {(r["engine"], r["batch"], r["threads"]): r.get("ms") for r in bench["results"]}
    rows = []
    for structure, suffix in (("ort", ""), ("default", "b")):
        for variant in ("exact", "fast"):
            engine = f"ort_dfqf_{'fast_' if variant == 'fast' else ''}{name}{suffix}"
            p = parity[structure]["onnx"][variant]
            row = {"bits": name, "graph": structure, "variant": variant, "engine": engine,
                   "agreement_with_integer": p["top1_agreement_with_integer"], "max_code_diff": p["max_code_diff"],
                   "top1": p["top1"], "integer_top1": parity[structure]["integer_top1"],
                   "integer_vs_fakequant_agreement": parity[structure]["top1_agreement"], "ms": {}, "vs_ort_int8": {}}
            for b in o.batch:
                for t in o.threads:
                    mine, peer = ms.get((engine, b, t)), ms.get(("ort_int8", b, t))
                    row["ms"][f"b{b}t{t}"] = mine
                    row["vs_ort_int8"][f"b{b}t{t}"] = round(mine / peer, 3) if mine and peer else None
            rows.append(row)
    return rows, {"bench": bench, "ort_int8_ms": {f"b{b}t{t}": ms.get(("ort_int8", b, t)) for b in o.batch
                                                   for t in o.threads}}


def engines(name: str) -> list[str]:
    return ["ort_int8", f"tvm_{name}", *(f"ort_dfqf_{v}{name}{s}" for s in ("", "b") for v in ("", "fast_"))]


def markdown(report: dict[str, Any]) -> str:
    configs = list(report["rows"][0]["ms"])
    lines = [f"# ONNX exports on ONNX Runtime ({report['environment']['cpu']})", "",
             f"ResNet20, benchmark teacher. Latency in ms (median), and as a multiple of `ort_int8` (ORT's own "
             f"`quantize_static` model of the teacher) measured in the same run; agreement: top-1 agreement with "
             f"the artifact's own integer graph on the 10,000 test images (`runtime.parity`). Goal: fast variant "
             f"≤ {GOAL}× ort_int8 with agreement ≥ {AGREEMENT_GOAL:.1%}.", "",
             "| bits | integer graph | ONNX variant | agreement with integer | max code diff | integer top-1 | "
             "integer vs fake-quant | " + " | ".join(f"{c} ms (× ort_int8)" for c in configs) + " |",
             "|---|---|---|---:|---:|---:|---:|" + "---:|" * len(configs)]
    for r in report["rows"]:
        cells = [f"{r['ms'][c]:.3g} ({r['vs_ort_int8'][c]:.2f}×)" if r["ms"][c] else "–" for c in configs]
        lines.append(f"| {r['bits']} | {r['graph']} | {r['variant']} | {r['agreement_with_integer']:.2%} | "
                     f"{r['max_code_diff']} | {r['integer_top1']} | {r['integer_vs_fakequant_agreement']:.2%} | "
                     + " | ".join(cells) + " |")
    for bits, peer in report["ort_int8_ms"].items():
        lines.append(f"\n`ort_int8` ({bits} run): " + ", ".join(f"{c} {v:.3g} ms" for c, v in peer.items()))
    lines += ["", f"Command: `{report['command']}` ({report['seconds']} s). Threads, batch and CPU as in the columns "
              "and title; each bench run interleaves its engines in one process per thread count."]
    return "\n".join(lines) + "\n"


@cli_main
def main(argv: list[str] | None = None) -> int:
    o = parse_options(OrtTableOptions, argv, "python -m benchmarks.ort_table", __doc__.splitlines()[0])
    for s in (o.student_int8, o.student_int4):
        if s is not None and not s.is_file():
            raise DFQFError(f"student not found: {s}")
    t0 = time.perf_counter()
    env = environment("benchmarks.ort_table", argv)
    rows, extra = rows_for("int8", o.student_int8, o)
    peers = {"int8": extra["ort_int8_ms"]}
    if o.student_int4 is not None:
        rows4, extra4 = rows_for("int4", o.student_int4, o)
        rows += rows4
        peers["int4"] = extra4["ort_int8_ms"]
    report = {"environment": env, "command": "python -m benchmarks.ort_table " + " ".join(argv or sys.argv[1:]),
              "seconds": round(time.perf_counter() - t0, 1), "goal": GOAL, "agreement_goal": AGREEMENT_GOAL,
              "rows": rows, "ort_int8_ms": peers}
    o.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report, o.out / "ort_table.json")
    (o.out / "ort_table.md").write_text(markdown(report))
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
