"""Accuracy table of the PTQ baselines (FP, minmax, DFQ, ZeroQ, recon, real-calib) at W8A8/W6A6/W4A4.

    python -m benchmarks.ptq_table [--data-dir D] [--bits 8,6,4] [--out benchmarks/results]

Same integer-deployable protocol as DFQF: per-channel symmetric weights, per-tensor activations
(unsigned after ReLU), quantized input and residual sums, first conv and last linear at 8 bits.
Each row runs the same code as `python -m train.ptq`; ZeroQ's distilled images are made once per
teacher and reused across bit widths and by `recon` (block reconstruction on them; their time is added to
every ZeroQ and recon row).
Writes ptq_table.md and ptq_table.json (with the machine and command) to --out.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core.cli import check_fields, cli_main, each, int_list, option, parse_options, positive
from core.files import write_json_atomic
from core.paths import resolve_data_dir
from train.data import image_batches, load_split
from train.evaluate import evaluate_top1
from train.models import get_arch, load_teacher
from train.ptq import METHODS, PTQContext, PTQOptions
from train.quant.convert import QuantConfig
from train.quant.spec import check_bits

from .environment import environment

TEACHERS = [  # (label, weights file in the data dir, evaluation split)
    ("resnet20 benchmark teacher (JPEG fine-tuned)", "teachers/resnet20_cifar10_jpeg.pt", "test"),
    ("resnet20 original", "teachers/resnet20_cifar10.pt", "lossless932"),
]
ROWS = [("minmax", "minmax"), ("minmax", "mse"), ("dfq", "bn-statistics"), ("zeroq", "minmax"), ("zeroq", "mse"),
        ("recon", "mse"), ("real-calib", "minmax"), ("real-calib", "mse")]
DISTILLED = ("zeroq", "recon")  # the methods that start from ZeroQ's distilled images


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(data_dir: Path, bits: list[int], zeroq_iters: int, zeroq_images: int) -> dict:
    env = environment("benchmarks.ptq_table")  # the commit and time the run started at
    info = get_arch("resnet20")
    results = []
    for label, weights, split in TEACHERS:
        teacher = load_teacher("resnet20", data_dir / weights)
        x, y = load_split(data_dir, "cifar10", split)
        batches = lambda: image_batches(x, y, info.mean, info.std, 500)  # noqa: E731
        t0 = time.perf_counter()
        fp, n = evaluate_top1(teacher, batches())
        log(f"{label}: FP {fp:.2f} on {split} ({n} images, {time.perf_counter() - t0:.1f}s)")
        distilled = None
        for b in bits:
            for method, observer in ROWS:
                args = PTQOptions(method, Path("unused"), wbits=b, abits=b, zeroq_iters=zeroq_iters,
                                  **({"observer": observer} if observer != "bn-statistics" else {}),
                                  **({"calib_size": zeroq_images} if method in DISTILLED else {}))
                ctx = PTQContext(teacher, info, QuantConfig(b, b, 8), args, data_dir,
                                 distilled_images=distilled[0] if method in DISTILLED and distilled else None)
                t0 = time.perf_counter()
                student, details = METHODS[method][0](ctx)
                seconds = time.perf_counter() - t0
                if method in DISTILLED:
                    if distilled is None:  # made once per teacher; its time counts in every ZeroQ/recon row
                        distilled = (ctx.distilled_images, details["distill_seconds"])
                    else:
                        seconds += distilled[1]
                top1, _ = evaluate_top1(student, batches())
                row = {"teacher": label, "split": split, "eval_images": n, "fp_top1": round(fp, 2),
                       "method": method, "observer": observer, "data_free": METHODS[method][1],
                       "wbits": b, "abits": b, "first_last_bits": 8, "top1": round(top1, 2),
                       "drop": round(fp - top1, 2), "quantize_seconds": round(seconds, 2),
                       "calibration_images": details.get("calibration_images")}
                results.append(row)
                log(f"  W{b}A{b} {method:10s} {observer:13s} {top1:6.2f} ({seconds:.1f}s)")
    return {"environment": env, "zeroq": {"iterations": zeroq_iters, "images": zeroq_images},
            "recon_steps": PTQOptions("recon", Path("unused")).recon_steps, "rows": results}


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = ["# PTQ baselines: top-1 (%) under the integer-deployable protocol", "",
             "Per-channel symmetric weights, per-tensor activations (unsigned after ReLU), quantized input and "
             "residual sums; first conv and last linear 8-bit. `real-calib` uses real training images: "
             "**not data-free**, an upper bound.", "",
             f"Command: `{env['command']}` — {env['date']}, commit {env['git_commit']}, {env['cpu']}, "
             f"{env['cores']} cores, torch {env['torch']} ({env['torch_threads']} threads). "
             f"ZeroQ: {res['zeroq']['images']} distilled images, {res['zeroq']['iterations']} steps.", "",
             "`ranges`: the range estimator — `minmax` (observed range), `mse` (clipping minimizing quantization "
             "MSE), `bn-statistics` (DFQ's beta ± 6 gamma). Times: seconds to quantize (not to evaluate) at each "
             "bit width; ZeroQ's images are distilled once per teacher and that time is counted in every ZeroQ "
             "and recon column. `recon`: block reconstruction on ZeroQ's images after MSE calibration (AdaRound "
             "rounding, LSQ activation steps, QDrop; `train.ptq --method recon`, "
             f"{res.get('recon_steps', '?')} steps per block). On the 932-image split one image is 0.11 points.",
             ""]
    for teacher in dict.fromkeys(r["teacher"] for r in res["rows"]):
        rows = [r for r in res["rows"] if r["teacher"] == teacher]
        bits = sorted({r["wbits"] for r in rows}, reverse=True)
        lines += [f"## {teacher} — FP {rows[0]['fp_top1']:.2f} on `{rows[0]['split']}` ({rows[0]['eval_images']} images)",
                  "", "| method | ranges | data-free | " + " | ".join(f"W{b}A{b}" for b in bits) + " | time (s) |",
                  "|---|---|---|" + "---:|" * (len(bits) + 1)]
        for method, observer in ROWS:
            cells = {r["wbits"]: r for r in rows if r["method"] == method and r["observer"] == observer}
            if not cells:
                continue
            times = "/".join(f"{cells[b]['quantize_seconds']:.1f}" for b in bits if b in cells)
            lines.append(f"| {method} | {observer} | {'yes' if cells[bits[0]]['data_free'] else '**no**'} | "
                         + " | ".join(f"{cells[b]['top1']:.2f}" if b in cells else "–" for b in bits)
                         + f" | {times} |")
        lines.append("")
    return "\n".join(lines)


@dataclass(frozen=True)
class TableOptions:
    data_dir: Path | None = option(None, "data folder (default $DFQF_DATA_DIR)")
    bits: list[int] = option([8, 6, 4], "bit widths of the rows, e.g. 8,6,4", parse=int_list, check=each(check_bits))
    zeroq_iters: int = option(500, "ZeroQ distillation steps", check=positive)
    zeroq_images: int = option(64, "ZeroQ distilled images", check=positive)
    out: Path = option(Path(__file__).parent / "results", "output folder")

    def __post_init__(self) -> None:
        check_fields(self)


@cli_main
def main(argv: list[str] | None = None) -> int:
    o = parse_options(TableOptions, argv, "python -m benchmarks.ptq_table", __doc__.splitlines()[0])
    res = run(resolve_data_dir(o.data_dir), o.bits, o.zeroq_iters, o.zeroq_images)
    o.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(res, o.out / "ptq_table.json")
    (o.out / "ptq_table.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
