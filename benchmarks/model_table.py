"""Speed across models: the integer module (W8A8) against torch int8 and ONNX Runtime int8 on CIFAR ResNets and
torchvision-class CNNs, one thread, with compile time, artifact size and the fraction of the peak of the unit the
convs ran on (AMX or VNNI).

    python -m benchmarks.model_table [--models resnet20,resnet56,mobilenet_v2,resnet18,resnet50] [--batch 1,16]
                                     [--runs-dir runs/model_table] [--out benchmarks/results]

CIFAR ResNets use the shared data's teachers (DFQ W8A8 students); the torchvision models use seeded random
weights (speed does not depend on the weights; said in the table) and min-max W8A8 students calibrated on
Gaussian noise. Each model is one `python -m benchmarks.bench` run (engines interleaved round by round in one
process); the table compares medians within a run. Writes model_table.md, .json and .png to --out.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.cli import check_fields, cli_main, each, int_list, one_of, option, parse_options, positive, str_list
from core.files import write_json_atomic

from .environment import environment
from .speed_table import DEFAULT_DATA, run_module
from .vnni_peak import measure_amx_peak, measure_peak

CIFAR_TEACHERS = {"resnet20": "teachers/resnet20_cifar10_jpeg.pt", "resnet56": "teachers/resnet56_cifar10.pt"}
MODELS = ("resnet20", "resnet56", "mobilenet_v2", "resnet18", "resnet50")
ENGINES = ("torch_int8", "ort_int8", "tvm_int8")


def log(msg: str) -> None:
    print(f"[model_table] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ModelTableOptions:
    models: list[str] = option(list(MODELS), "models to measure", parse=str_list, check=each(one_of(*MODELS)))
    batch: list[int] = option([1, 16], "batch sizes", parse=int_list, check=each(positive))
    repeat: int = option(20, "timed rounds per configuration", check=positive)
    budget: float = option(15.0, "seconds per engine and configuration", check=positive)
    data_dir: Path = option(Path(os.environ.get("DFQF_DATA_DIR") or DEFAULT_DATA), "the shared data folder")
    runs_dir: Path = option(Path("runs/model_table"), "students and artifacts")
    out: Path = option(Path("benchmarks/results"), "output folder")

    def __post_init__(self) -> None:
        check_fields(self)


def student(arch: str, o: ModelTableOptions) -> tuple[Path, str]:
    """The W8A8 student of `arch` (made when missing) and where its weights come from."""
    folder = o.runs_dir / arch
    path = folder / "student.pt"
    if arch in CIFAR_TEACHERS:
        weights, source, method = o.data_dir / CIFAR_TEACHERS[arch], CIFAR_TEACHERS[arch], "dfq"
    else:
        weights, source, method = folder / "random_weights.pt", "seeded random weights", "minmax"
        if not weights.is_file():
            import torch

            from train.models import build_model

            torch.manual_seed(0)
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(build_model(arch).state_dict(), weights)
    if not path.is_file():
        log(f"{arch}: train.ptq --method {method}")
        run_module("train.ptq", ["--method", method, "--arch", arch, "--weights", str(weights), "--wbits", "8",
                                 "--abits", "8", "--calib-size", "32", "--batch-size", "16", "--out", str(folder)])
    return path, source


def measure(arch: str, o: ModelTableOptions, peak: float) -> dict[str, Any]:
    path, source = student(arch, o)
    artifact = path.parent / "llvm"
    t0 = time.perf_counter()
    run_module("lower.compile", [str(path), "--out", str(artifact), "--force", "--no-onnx"])
    compile_s = time.perf_counter() - t0
    manifest = json.loads((artifact / "manifest.json").read_text())
    log(f"{arch}: compiled in {compile_s:.0f} s; benchmarking")
    args = [str(artifact), "--batch", ",".join(map(str, o.batch)), "--threads", "1", "--engines", ",".join(ENGINES),
            "--repeat", str(o.repeat), "--budget", str(o.budget), "--vnni-peak", str(peak), "--calib-images", "32"]
    if arch in CIFAR_TEACHERS:
        args += ["--data-dir", str(o.data_dir)]
    report = json.loads(run_module("benchmarks.bench", args).strip().splitlines()[-1])
    return {"arch": arch, "weights": source, "compile_seconds": round(compile_s, 1),
            "artifact_bytes": sum(f["bytes"] for f in manifest["files"].values()),
            "schedules": manifest["schedules"], "macs_per_image": report["macs_per_image"],
            "results": [r for r in report["results"] if r["threads"] == 1]}


def unit_fraction(row: dict[str, Any], result: dict[str, Any], peak: float, amx_peak: float | None) -> str:
    """Our module's MAC rate as a percentage of the peak of the unit its convs ran on (AMX for the x86_amx set,
    else VNNI), with the unit's name."""
    on_amx = row.get("schedules") == "x86_amx" and amx_peak
    if not result.get("gops"):
        return "–"
    return f"{100 * result['gops'] / 2 / (amx_peak if on_amx else peak):.1f} ({'AMX' if on_amx else 'VNNI'})"


def markdown(rows: list[dict[str, Any]], env: dict[str, Any], peak: float, amx_peak: float | None = None) -> str:
    amx = f" and AMX tdpbusd peak {amx_peak} GMAC/s" if amx_peak else ""
    lines = ["# Speed across models (W8A8, one thread)", "",
             f"{env['date']}, `{env['command']}`, {env['cpu']} ({env['cores']} cores), torch {env['torch']}; "
             f"this core's VNNI peak {peak} GMAC/s{amx} (`benchmarks.vnni_peak`). Medians of interleaved rounds "
             "within one `benchmarks.bench` run per model; ratios are the best int8 peer's time over ours; the "
             "peak fraction is of the unit our convs ran on (the schedule set of the module).", "",
             "| model (weights) | batch | torch int8 ms | ORT int8 ms | TVM int8 ms (ours) | vs best peer | "
             "% of unit peak | compile s | artifact MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        by = {(r["engine"], r["batch"]): r for r in row["results"]}
        for b in sorted({r["batch"] for r in row["results"]}):
            cell = {e: by.get((e, b), {}) for e in ENGINES}
            ms = {e: c.get("ms") if c.get("status") == "ok" else None for e, c in cell.items()}
            peers = [v for e, v in ms.items() if e != "tvm_int8" and v]
            ratio = f"{min(peers) / ms['tvm_int8']:.2f}×" if peers and ms["tvm_int8"] else "–"
            fmt = {e: f"{v:.3f}" if v else cell[e].get("status", "–") for e, v in ms.items()}
            lines.append(f"| {row['arch']} ({row['weights']}) | {b} | {fmt['torch_int8']} | {fmt['ort_int8']} | "
                         f"**{fmt['tvm_int8']}** | {ratio} | {unit_fraction(row, cell['tvm_int8'], peak, amx_peak)} | "
                         f"{row['compile_seconds']} | {row['artifact_bytes'] / 1e6:.2f} |")
    reasons = {f"{row['arch']} {r['engine']}": r.get("reason") for row in rows for r in row["results"]
               if r.get("status") != "ok"}
    if reasons:
        lines += ["", "Not measured: " + "; ".join(f"{k}: {v}" for k, v in reasons.items())]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{row['arch']}\nb{r}" for row in rows for r in sorted({x["batch"] for x in row["results"]})]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    for k, engine in enumerate(ENGINES):
        vals = []
        for row in rows:
            by = {(r["engine"], r["batch"]): r for r in row["results"]}
            for b in sorted({x["batch"] for x in row["results"]}):
                r = by.get((engine, b), {})
                vals.append(r["ms"] if r.get("status") == "ok" else np.nan)
        ax.bar(np.arange(len(labels)) + (k - 1) * 0.27, vals, 0.27, label=engine)
    ax.set_xticks(np.arange(len(labels)), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (median, one thread)")
    ax.set_title("W8A8 inference: lower is better")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@cli_main
def main(argv: list[str] | None = None) -> int:
    o = parse_options(ModelTableOptions, argv, "python -m benchmarks.model_table", __doc__.splitlines()[0])
    env = environment("benchmarks.model_table", argv)
    peak = measure_peak()["gmacs"]
    amx_peak = (measure_amx_peak() or {}).get("amx_gmacs")
    rows = []
    for arch in o.models:
        rows.append(measure(arch, o, peak))
        o.out.mkdir(parents=True, exist_ok=True)  # after every model: partial progress is kept
        write_json_atomic({"environment": env, "vnni_peak_gmacs": peak, "amx_peak_gmacs": amx_peak, "rows": rows},
                          o.out / "model_table.json")
        (o.out / "model_table.md").write_text(markdown(rows, env, peak, amx_peak))
    chart(rows, o.out / "model_table.png")
    print((o.out / "model_table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
