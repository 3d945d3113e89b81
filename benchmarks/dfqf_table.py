"""DFQF accuracy table: DFQF at several bit widths, ablations, and the PTQ baselines, one protocol.

    python -m benchmarks.dfqf_table [--rows w4a4,w8a8,...] [--seeds 0,1,2] [--jobs 2] [--runs-dir runs/bench]
                                    [--data-dir D]
    python -m benchmarks.dfqf_table --rows ""      (only rewrite dfqf_table.md from dfqf_table.json)

Each row is one `python -m train.dfqf` run per seed (the defaults of train/dfqf_config.py plus the row's flags
and `--seed S`) in its own folder under --runs-dir (`ROW` for seed 0, `ROW-seedS` for the others); an
interrupted table resumes its runs (`--resume`) and skips finished ones. `--jobs N` runs N of them at once
(each with the torch threads the environment gives, e.g. OMP_NUM_THREADS=1). After every finished run,
dfqf_table.json and dfqf_table.md are rewritten with all runs measured so far: rows and seeds of earlier
invocations kept in dfqf_table.json stay, a rerun seed replaces its old result, and a run whose config differs
from the seeds a row has (the defaults changed) replaces them instead of joining them. A row of several seeds shows
their mean ± sample standard deviation and every seed's value. A row whose resolved config equals another
row's (e.g. `w4a4-no-adversarial` while the default adversarial weight is 0) is not run: the table says which
row it is. The PTQ rows come from ptq_table.json (`python -m benchmarks.ptq_table`).
"""
from __future__ import annotations

import fcntl
import json
import statistics
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.cli import check_fields, cli_main, each, one_of, option, parse_options, positive, seed_list, str_list
from core.errors import DFQFError
from core.files import atomic_write, write_json_atomic
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
# images per evaluation split, for reports written before train.dfqf recorded `eval_images`
SPLIT_IMAGES = {"test": 10000, "lossless932": 932}
# config fields shown in the table's run-config line
SHOWN = ("g_steps", "g_batch", "synth_images", "s_epochs", "s_batch", "s_lr", "s_scale_lr", "temperature",
         "s_ema", "w_inception", "w_balance", "w_bn", "w_adv", "w_ce", "alt_steps")


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


def run_folder(runs_dir: Path, name: str, seed: int) -> Path:
    return runs_dir / (name if seed == 0 else f"{name}-seed{seed}")


def run_row(name: str, seed: int, data_dir: Path, runs_dir: Path, quiet: bool = False) -> dict[str, Any]:
    """One seed of a row: its train.dfqf run (made or resumed when its report is missing; `quiet`: its output
    goes to dfqf_table.log in the run folder instead of this terminal) and its report."""
    teacher, split, extra = ROWS[name]
    out = run_folder(runs_dir, name, seed)
    if not (out / "report.json").exists():
        cmd = [sys.executable, "-m", "train.dfqf", "--weights", str(data_dir / teacher), "--data-dir",
               str(data_dir), "--split", split, "--out", str(out), "--progress", "false", "--seed", str(seed),
               *extra]
        if (out / "config.json").exists():
            cmd.append("--resume")
        print(f"[dfqf_table] {name} seed {seed}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        log = out / "dfqf_table.log"
        if quiet:
            out.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") if quiet else nullcontext() as f:
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT if quiet else None).returncode:
                raise DFQFError(f"{name} seed {seed}: train.dfqf failed" + (f", see {log}" if quiet else ""))
    report = json.loads((out / "report.json").read_text())
    config = json.loads((out / "config.json").read_text())
    return {**report, "config": {k: config.get(k) for k in SHOWN}}


def as_seeds(row: dict[str, Any]) -> dict[str, Any]:
    """A row in the per-seed form {"flags", "config", "seeds": {seed: report}}; rows that dfqf_table.json kept
    from before seeds were a column (one report with its flags and config, seed in both) are converted."""
    if "same_as" in row or "seeds" in row:
        return row
    report = {k: v for k, v in row.items() if k not in ("flags", "config")}
    config = {k: v for k, v in (row.get("config") or {}).items() if k != "seed"}
    return {"flags": row.get("flags", ""), "config": config, "seeds": {str(report.get("seed", 0)): report}}


def summary(row: dict[str, Any]) -> dict[str, Any]:
    """Mean (and sample standard deviation over two or more seeds) of a row's per-seed results."""
    runs = [row["seeds"][k] for k in sorted(row["seeds"], key=int)]

    def mean(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.fmean(values) if values else None

    top1 = [r["fakequant_top1"] for r in runs]
    images = runs[0].get("eval_images") or SPLIT_IMAGES.get(runs[0].get("split"))
    p = statistics.fmean(top1) / 100
    return {"seeds": [int(r.get("seed", 0)) for r in runs], "top1": top1,
            "mean": statistics.fmean(top1), "std": statistics.stdev(top1) if len(top1) > 1 else None,
            # one run's binomial standard error on a split of `images` images, in points
            "binomial": 100 * (p * (1 - p) / images) ** 0.5 if images else None,
            "fp": mean("fp_top1"), "raw": mean("fakequant_top1_without_ema"), "wall": mean("wall_seconds"),
            "first": runs[0]}


def markdown(rows: dict[str, dict], env: dict, ptq: dict | None) -> str:
    measured = {n: summary(r) for n, r in rows.items() if "same_as" not in r}
    reports = [r for row in rows.values() for r in row.get("seeds", {}).values()]
    threads = sorted({str(r.get("threads") or "?") for r in reports})
    lines = ["# DFQF accuracy (top-1 %, integer-deployable protocol, first/last layer 8-bit)", "",
             "Rows with `--protocol paper` are the DFQF paper's protocol instead (BN unfolded and trained, per-tensor "
             "weights, residual sums in float): fake-quant only, not deployable (`lower.compile` refuses them).", "",
             f"Last command: `{env['command']}` — {env['date']}, commit {env['git_commit']}, {env['cpu']}, "
             f"{env['cores']} cores, torch {env['torch']}. Each row is one `python -m train.dfqf` run per seed "
             f"with the row's flags; wall time is the whole run on this CPU with "
             f"{', '.join(threads)} torch thread(s) (column `threads`); it grows when other jobs share the cores. "
             "Float kernels differ between CPUs, so a seed reproduces bit for bit on one machine type only.", ""]
    sources = {(m["date"], m["command"], m["git_commit"], m["cpu"]) for r in reports if (m := r.get("measured"))}
    if sources:  # seeds kept from earlier invocations were measured by those, oldest first
        lines += ["Seeds were measured by: " + "; ".join(f"`{c}` (commit {g}, {cpu}, {d[:10]})"
                                                     for d, c, g, cpu in sorted(sources))
                  + (" and, for seeds without a record in `dfqf_table.json`, earlier invocations (git history)."
                     if any("measured" not in r for r in reports) else "."), ""]
    def shown(c: DFQFConfig) -> dict[str, Any]:
        return {k: getattr(c, k) for k in SHOWN}

    # every row was run with today's defaults plus its own flags
    if measured and all(r.get("config") == shown(row_config(n)[2]) for n, r in rows.items() if n in measured):
        cfg = shown(resolve([]))
        lines += ["Run config (the defaults; rows change only their flags): "
                  + ", ".join(f"{k}={v}" for k, v in cfg.items() if v is not None and k != "alt_steps")
                  + f"; alternating schedule: alt_steps={cfg.get('alt_steps')}.", ""]
    else:
        lines += ["Rows were run with different defaults; each row's config is in `dfqf_table.json`.", ""]
    lines += ["DFQF fake-quant is the saved student (the EMA when one is kept): the mean ± sample std over the "
              "row's seeds when it has several, each seed's value in `per seed`; `last raw` is the same runs' last "
              "student before averaging (mean); `binomial SE` is one run's sampling error on the split's images, "
              "sqrt(p (1 − p) / images).", "",
              "| row | flags | teacher / split | FP | DFQF fake-quant | drop | per seed (seeds) | binomial SE "
              "| last raw | G steps | KD steps | EMA decay | threads | wall (min) | images generated |",
              "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        if "same_as" in r:
            lines.append(f"| {name} | {r['flags']} | = `{r['same_as']}` (identical run: {r['why']}) "
                         "| | | | | | | | | | | | |")
            continue
        m = measured[name]
        f = m["first"]
        teacher = Path(f.get("teacher") or "").name
        ema = f.get("student_ema_decay")
        top1 = f"{m['mean']:.2f}" if m["std"] is None else f"{m['mean']:.2f} ± {m['std']:.2f}"
        per_seed = ", ".join(f"{v:.2f}" for v in m["top1"]) + f" ({', '.join(map(str, m['seeds']))})"
        fp = m["fp"] if m["fp"] is not None else float("nan")
        raw = "—" if m["raw"] is None else f"{m['raw']:.2f}"
        binomial = "—" if m["binomial"] is None else f"{m['binomial']:.2f}"
        lines.append(f"| {name} | {r.get('flags') or '(defaults)'} | {teacher} / {f.get('split')} | {fp:.2f} | "
                     f"{top1} | {fp - m['mean']:.2f} | {per_seed} | {binomial} | {raw} | {f['generator_steps']} | "
                     f"{f['student_steps']} | {'off' if not ema else f'{ema:.4f}'} | {f.get('threads', '?')} | "
                     f"{m['wall'] / 60:.1f} | {f['images_generated']} |")
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
    ordered = {n: as_seeds(rows[n]) for n in ROWS if n in rows}
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic({"environment": env, "rows": ordered}, RESULTS / "dfqf_table.json")
    text = markdown(ordered, env, ptq)
    atomic_write(RESULTS / "dfqf_table.md", "w", lambda f: f.write(text))
    return text


@dataclass(frozen=True)
class DFQFTableOptions:
    rows: list[str] = option(list(ROWS), f"comma-separated subset of {', '.join(ROWS)} (empty: re-render the "
                             "table from dfqf_table.json)", parse=str_list, check=each(one_of(*ROWS)))
    seeds: list[int] = option([0], "seeds to run for every row (each adds to the seeds a row already has)",
                              parse=seed_list)
    jobs: int = option(1, "runs at once (their output goes to dfqf_table.log in each run folder when > 1)",
                       check=positive)
    runs_dir: Path = option(Path("runs/bench"), "where the rows' runs go")
    data_dir: Path | None = option(None, "data folder (default $DFQF_DATA_DIR)")

    def __post_init__(self) -> None:
        check_fields(self)


@contextmanager
def saved_rows() -> Iterator[dict[str, dict]]:
    """dfqf_table.json's rows (per seed), read and then written back under a lock: invocations that run at the
    same time (other rows or seeds) each add their results to the file instead of one overwriting another's."""
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / ".dfqf_table.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = RESULTS / "dfqf_table.json"
        rows = json.loads(previous.read_text())["rows"] if previous.exists() else {}
        yield rows


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_options(DFQFTableOptions, argv, "python -m benchmarks.dfqf_table", __doc__.splitlines()[0])
    names = args.rows
    previous = RESULTS / "dfqf_table.json"
    if not names:  # re-render only: keep the environment of the invocation that ran the rows
        if not previous.exists():
            raise DFQFError(f"--rows is empty and there is no {previous} to render")
        env = json.loads(previous.read_text())["environment"]
        with saved_rows() as rows:  # under the lock: a run finishing meanwhile is not dropped
            print(write(rows, env))
        return 0
    env = environment("benchmarks.dfqf_table")
    data_dir = resolve_data_dir(args.data_dir)
    runs = []
    with saved_rows() as rows:
        for name in names:
            twin = same_as(name)
            if twin is not None:
                rows[name] = {"same_as": twin, "flags": " ".join(ROWS[name][2]),
                              "why": f"`{' '.join(ROWS[name][2])}` is already the default"}
            else:
                runs += [(name, seed) for seed in args.seeds]
        text = write(rows, env) if rows else ""
    where = {k: env.get(k) for k in ("date", "cpu", "cores", "git_commit", "command")}
    failed: list[str] = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        started = {pool.submit(run_row, name, seed, data_dir, Path(args.runs_dir), args.jobs > 1): (name, seed)
                   for name, seed in runs}
        for done in as_completed(started):
            name, seed = started[done]
            try:
                report = done.result()
            except DFQFError as e:  # the other runs go on; said at the end
                failed.append(f"{name} seed {seed}: {e}")
                continue
            config = report.pop("config")
            with saved_rows() as rows:  # after every run: partial progress is kept
                row = as_seeds(rows[name]) if name in rows else None
                if row is None or "seeds" not in row or row.get("config") != config:
                    row = {"flags": " ".join(ROWS[name][2]), "config": config, "seeds": {}}
                row["seeds"][str(seed)] = {**report, "measured": where}
                rows[name] = row
                text = write(rows, env)
    print(text)
    if failed:
        raise DFQFError(f"{len(failed)} of {len(runs)} runs failed (the others are in the table): {'; '.join(failed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
