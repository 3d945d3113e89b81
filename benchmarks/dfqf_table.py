"""DFQF accuracy table: DFQF at several bit widths, ablations, and the PTQ baselines, one protocol.

    python -m benchmarks.dfqf_table [--rows w4a4,w8a8,...] [--runs-dir runs/bench] [--data-dir D]
    python -m benchmarks.dfqf_table --rows ""      (only rewrite dfqf_table.md from dfqf_table.json)

Each row is one `python -m train.dfqf` run (the defaults of train/dfqf_config.py plus the row's flags) in
its own folder under --runs-dir; an interrupted table resumes its runs (`--resume`) and skips finished
ones. After every finished row, dfqf_table.json and dfqf_table.md are rewritten with all rows measured so
far: rows of earlier invocations kept in dfqf_table.json stay, a rerun row replaces its old result. A row
whose resolved config equals another row's (e.g. `w4a4-no-adversarial` while the default adversarial
weight is 0) is not run: the table says which row it is. The PTQ rows come from ptq_table.json
(`python -m benchmarks.ptq_table`).
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.cli import check_fields, cli_main, each, one_of, option, parse_options, str_list
from core.errors import DFQFError
from core.paths import resolve_data_dir
from train.dfqf_config import DFQFConfig, resolve

from .environment import environment

RESULTS = Path(__file__).parent / "results"
JPEG, ORIGINAL = "teachers/resnet20_cifar10_jpeg.pt", "teachers/resnet20_cifar10.pt"
RESNET56 = "teachers/resnet56_cifar10.pt"
# name -> (teacher, split, extra flags)
ROWS: dict[str, tuple[str, str, list[str]]] = {
    "w8a8": (JPEG, "test", ["--wbits", "8", "--abits", "8"]),
    "w5a5": (JPEG, "test", ["--wbits", "5", "--abits", "5"]),
    "w4a4": (JPEG, "test", []),
    "w3a3": (JPEG, "test", ["--wbits", "3", "--abits", "3"]),
    "w4a4-original": (ORIGINAL, "lossless932", []),
    # protocol (b): the residual stream (activations read by a shortcut and a conv) at 8 bits, still integer
    "w4a4-res8": (JPEG, "test", ["--residual-bits", "8"]),
    # a deeper teacher the defaults were not tuned on (public weights: JPEG test split, lossless932 in parity)
    "w4a4-resnet56": (RESNET56, "test", ["--arch", "resnet56"]),
    "w4a4-no-inception": (JPEG, "test", ["--w-inception", "0"]),
    "w4a4-no-bn": (JPEG, "test", ["--w-bn", "0"]),
    "w4a4-no-adversarial": (JPEG, "test", ["--w-adv", "0"]),
    # alternating G/S steps, 800 of each (two-stage: 300 G, 400 S): about 35 min on one thread here
    "w4a4-alternating": (JPEG, "test", ["--schedule", "alternating", "--alt-steps", "800"]),
    # protocol (c): the paper's (BN unfolded and trained, per-tensor weights, float residual sums), fake-quant only
    "w4a4-paper-protocol": (JPEG, "test", ["--protocol", "paper"]),
}
# config fields shown in the table's run-config line
SHOWN = ("g_steps", "g_batch", "synth_images", "s_epochs", "s_batch", "s_lr", "s_scale_lr", "temperature",
         "s_ema", "w_inception", "w_balance", "w_bn", "w_adv", "w_ce", "alt_steps", "seed")


def row_config(name: str) -> tuple[str, str, DFQFConfig]:
    teacher, split, extra = ROWS[name]
    return teacher, split, resolve(extra)


def same_as(name: str) -> str | None:
    """The first other row that would be exactly this run (same teacher, split and resolved config)."""
    mine = row_config(name)
    for other in ROWS:
        if other == name:
            return None  # only an earlier row can stand in for this one
        if row_config(other) == mine:
            return other
    return None


def run_row(name: str, data_dir: Path, runs_dir: Path) -> dict[str, Any]:
    teacher, split, extra = ROWS[name]
    out = runs_dir / name
    if not (out / "report.json").exists():
        cmd = [sys.executable, "-m", "train.dfqf", "--weights", str(data_dir / teacher), "--data-dir",
               str(data_dir), "--split", split, "--out", str(out), "--progress", "false", *extra]
        if (out / "config.json").exists():
            cmd.append("--resume")
        print(f"[dfqf_table] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    report = json.loads((out / "report.json").read_text())
    config = json.loads((out / "config.json").read_text())
    return {**report, "flags": " ".join(extra), "config": {k: config.get(k) for k in SHOWN}}


def markdown(rows: dict[str, dict], env: dict, ptq: dict | None) -> str:
    measured = {n: r for n, r in rows.items() if "same_as" not in r}
    threads = sorted({str(r.get("threads") or "?") for r in measured.values()})
    lines = ["# DFQF accuracy (top-1 %, integer-deployable protocol, first/last layer 8-bit)", "",
             "Rows with `--protocol paper` are the DFQF paper's protocol instead (BN unfolded and trained, per-tensor "
             "weights, residual sums in float): fake-quant only, not deployable (`lower.compile` refuses them).", "",
             f"Last command: `{env['command']}` — {env['date']}, commit {env['git_commit']}, {env['cpu']}, "
             f"{env['cores']} cores, torch {env['torch']}. Each row is one `python -m train.dfqf` run with the "
             f"row's flags; wall time is the whole run on this CPU with "
             f"{', '.join(threads)} torch thread(s) (column `threads`); it grows when other jobs share the cores.",
             ""]
    def shown(c: DFQFConfig) -> dict[str, Any]:
        return {k: getattr(c, k) for k in SHOWN}

    # every row was run with today's defaults plus its own flags
    if measured and all(r.get("config") == shown(row_config(n)[2]) for n, r in measured.items()):
        cfg = shown(resolve([]))
        lines += ["Run config (the defaults; rows change only their flags): "
                  + ", ".join(f"{k}={v}" for k, v in cfg.items() if v is not None and k != "alt_steps")
                  + f"; alternating schedule: alt_steps={cfg.get('alt_steps')}.", ""]
    else:
        lines += ["Rows were run with different defaults; each row's config is in `dfqf_table.json`.", ""]
    lines += ["DFQF fake-quant is the saved student (the EMA when one is kept); `last raw` is the same run's last "
              "student before averaging.", "",
              "| row | flags | teacher / split | FP | DFQF fake-quant | drop | last raw | G steps | KD steps "
              "| EMA decay | threads | wall (min) | images generated |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        if "same_as" in r:
            lines.append(f"| {name} | {r['flags']} | = `{r['same_as']}` (identical run: {r['why']}) "
                         "| | | | | | | | | | |")
            continue
        teacher = Path(r.get("teacher") or "").name
        ema = r.get("student_ema_decay")
        lines.append(f"| {name} | {r.get('flags') or '(defaults)'} | {teacher} / {r.get('split')} | "
                     f"{r.get('fp_top1', float('nan')):.2f} | {r.get('fakequant_top1', float('nan')):.2f} | "
                     f"{r.get('fp_top1', 0) - r.get('fakequant_top1', 0):.2f} | "
                     f"{r['fakequant_top1_without_ema'] if 'fakequant_top1_without_ema' in r else '—'} | "
                     f"{r['generator_steps']} | "
                     f"{r['student_steps']} | {'off' if not ema else f'{ema:.4f}'} | {r.get('threads', '?')} | "
                     f"{r['wall_seconds'] / 60:.1f} | {r['images_generated']} |")
    missing = [n for n in ROWS if n not in rows]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)} (`--rows` runs them; finished rows are kept)."]
    if ptq:
        lines += ["", "PTQ baselines on the same protocol (from `ptq_table.json`, W4A4):", "",
                  "| teacher | method | ranges | data-free | top-1 |", "|---|---|---|---|---:|"]
        for r in ptq["rows"]:
            if r["wbits"] == 4:
                lines.append(f"| {r['teacher']} | {r['method']} | {r['observer']} | "
                             f"{'yes' if r['data_free'] else '**no**'} | {r['top1']:.2f} |")
    return "\n".join(lines) + "\n"


def write(rows: dict[str, dict], env: dict) -> str:
    ptq_file = RESULTS / "ptq_table.json"
    ptq = json.loads(ptq_file.read_text()) if ptq_file.exists() else None
    ordered = {n: rows[n] for n in ROWS if n in rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dfqf_table.json").write_text(json.dumps({"environment": env, "rows": ordered}, indent=2) + "\n")
    text = markdown(ordered, env, ptq)
    (RESULTS / "dfqf_table.md").write_text(text)
    return text


@dataclass(frozen=True)
class DFQFTableOptions:
    rows: list[str] = option(list(ROWS), f"comma-separated subset of {', '.join(ROWS)} (empty: re-render the "
                             "table from dfqf_table.json)", parse=str_list, check=each(one_of(*ROWS)))
    runs_dir: Path = option(Path("runs/bench"), "where the rows' runs go")
    data_dir: Path | None = option(None, "data folder (default $DFQF_DATA_DIR)")

    def __post_init__(self) -> None:
        check_fields(self)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_options(DFQFTableOptions, argv, "python -m benchmarks.dfqf_table", __doc__.splitlines()[0])
    names = args.rows
    previous = RESULTS / "dfqf_table.json"
    if not names:  # re-render only: keep the environment of the invocation that ran the rows
        if not previous.exists():
            raise DFQFError(f"--rows is empty and there is no {previous} to render")
        saved = json.loads(previous.read_text())
        print(write(saved["rows"], saved["environment"]))
        return 0
    env = environment("benchmarks.dfqf_table")
    data_dir = resolve_data_dir(args.data_dir)
    rows: dict[str, dict] = json.loads(previous.read_text())["rows"] if previous.exists() else {}
    text = ""
    for name in names:
        twin = same_as(name)
        if twin is not None:
            rows[name] = {"same_as": twin, "flags": " ".join(ROWS[name][2]),
                          "why": f"`{' '.join(ROWS[name][2])}` is already the default"}
        else:
            rows[name] = run_row(name, data_dir, Path(args.runs_dir))
        text = write(rows, env)  # after every row: partial progress is kept
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
