"""DFQF accuracy table: DFQF at several bit widths, ablations, and the PTQ baselines, one protocol.

    python -m benchmarks.dfqf_table [--rows w4a4,w8a8,...] [--runs-dir runs/bench] [--data-dir D]

Each row is one `python -m train.dfqf` run in its own folder under --runs-dir; an interrupted table
resumes its runs (`--resume`) and skips finished ones. The PTQ rows come from ptq_table.json
(`python -m benchmarks.ptq_table`). Writes dfqf_table.md and dfqf_table.json next to this file's results.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from train.data import resolve_data_dir
from train.errors import CLIParser

from .environment import environment

RESULTS = Path(__file__).parent / "results"
JPEG, ORIGINAL = "teachers/resnet20_cifar10_jpeg.pt", "teachers/resnet20_cifar10.pt"
# name -> (teacher, split, extra flags)
ROWS: dict[str, tuple[str, str, list[str]]] = {
    "w8a8": (JPEG, "test", ["--wbits", "8", "--abits", "8"]),
    "w5a5": (JPEG, "test", ["--wbits", "5", "--abits", "5"]),
    "w4a4": (JPEG, "test", []),
    "w3a3": (JPEG, "test", ["--wbits", "3", "--abits", "3"]),
    "w4a4-original": (ORIGINAL, "lossless932", []),
    "w4a4-no-inception": (JPEG, "test", ["--w-inception", "0"]),
    "w4a4-no-bn": (JPEG, "test", ["--w-bn", "0"]),
    "w4a4-no-adversarial": (JPEG, "test", ["--w-adv", "0"]),
    "w4a4-alternating": (JPEG, "test", ["--schedule", "alternating"]),
}


def run_row(name: str, data_dir: Path, runs_dir: Path) -> dict:
    teacher, split, extra = ROWS[name]
    out = runs_dir / name
    if (out / "report.json").exists():
        return json.loads((out / "report.json").read_text())
    cmd = [sys.executable, "-m", "train.dfqf", "--weights", str(data_dir / teacher), "--data-dir", str(data_dir),
           "--split", split, "--out", str(out), "--progress", "false", *extra]
    if (out / "config.json").exists():
        cmd.append("--resume")
    print(f"[dfqf_table] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / "report.json").read_text())


def markdown(rows: dict[str, dict], env: dict, ptq: dict | None) -> str:
    lines = ["# DFQF accuracy (top-1 %, integer-deployable protocol, first/last layer 8-bit)", "",
             f"Command: `{env['command']}` — {env['date']}, commit {env['git_commit']}, {env['cpu']}, "
             f"{env['cores']} cores, torch {env['torch']}. Wall time is the whole `train.dfqf` run on this CPU.", "",
             "| row | teacher / split | FP | DFQF fake-quant | drop | wall (min) | images generated |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        teacher = Path(r.get("teacher") or "").name
        lines.append(f"| {name} | {teacher} / {r.get('split')} | {r.get('fp_top1', float('nan')):.2f} | "
                     f"{r.get('fakequant_top1', float('nan')):.2f} | "
                     f"{r.get('fp_top1', 0) - r.get('fakequant_top1', 0):.2f} | {r['wall_seconds'] / 60:.1f} | "
                     f"{r['images_generated']} |")
    if ptq:
        lines += ["", "PTQ baselines on the same protocol (from `ptq_table.json`, W4A4):", "",
                  "| teacher | method | ranges | data-free | top-1 |", "|---|---|---|---|---:|"]
        for r in ptq["rows"]:
            if r["wbits"] == 4:
                lines.append(f"| {r['teacher']} | {r['method']} | {r['observer']} | "
                             f"{'yes' if r['data_free'] else '**no**'} | {r['top1']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = CLIParser(prog="python -m benchmarks.dfqf_table", description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    p.add_argument("--runs-dir", default="runs/bench")
    p.add_argument("--data-dir")
    args = p.parse_args(argv)
    env = environment("benchmarks.dfqf_table")
    data_dir = resolve_data_dir(args.data_dir)
    names = [n for n in args.rows.split(",") if n]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}")
    rows = {n: run_row(n, data_dir, Path(args.runs_dir)) for n in names}
    ptq_file = RESULTS / "ptq_table.json"
    ptq = json.loads(ptq_file.read_text()) if ptq_file.exists() else None
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dfqf_table.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    (RESULTS / "dfqf_table.md").write_text(markdown(rows, env, ptq))
    print(markdown(rows, env, ptq))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
