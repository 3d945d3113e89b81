"""Accuracy table of the PTQ baselines (FP, minmax, DFQ, ZeroQ, real-calib) at W8A8/W6A6/W4A4.

    python -m benchmarks.ptq_table [--data-dir D] [--bits 8,6,4] [--out benchmarks/results]

Same integer-deployable protocol as DFQF: per-channel symmetric weights, per-tensor activations
(unsigned after ReLU), quantized input and residual sums, first conv and last linear at 8 bits.
Each row runs the same code as `python -m train.ptq`; ZeroQ's distilled images are made once per
teacher and reused across bit widths (their time is added to every ZeroQ row).
Writes ptq_table.md and ptq_table.json (with the machine and command) to --out.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from train.data import image_batches, load_split, resolve_data_dir
from train.errors import CLIParser
from train.evaluate import evaluate_top1
from train.models import get_arch, load_teacher
from train.ptq import METHODS, PTQContext, parser as ptq_parser
from train.quant.convert import QuantConfig

from .environment import environment

TEACHERS = [  # (label, weights file in the data dir, evaluation split)
    ("resnet20 benchmark teacher (JPEG fine-tuned)", "teachers/resnet20_cifar10_jpeg.pt", "test"),
    ("resnet20 original", "teachers/resnet20_cifar10.pt", "lossless932"),
]
ROWS = [("minmax", "minmax"), ("minmax", "mse"), ("dfq", "bn-statistics"), ("zeroq", "minmax"), ("zeroq", "mse"),
        ("real-calib", "minmax"), ("real-calib", "mse")]


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
                argv = ["--method", method, "--out", "unused", "--wbits", str(b), "--abits", str(b),
                        "--zeroq-iters", str(zeroq_iters)]
                if observer != "bn-statistics":
                    argv += ["--observer", observer]
                if method == "zeroq":
                    argv += ["--calib-size", str(zeroq_images)]
                args = ptq_parser().parse_args(argv)
                ctx = PTQContext(teacher, info, QuantConfig(b, b, 8), args, data_dir,
                                 distilled_images=distilled[0] if method == "zeroq" and distilled else None)
                t0 = time.perf_counter()
                student, details = METHODS[method][0](ctx)
                seconds = time.perf_counter() - t0
                if method == "zeroq":
                    if distilled is None:  # made once per teacher; its time counts in every ZeroQ row
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
            "rows": results}


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
             "column. On the 932-image split one image is 0.11 points.", ""]
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


def main(argv: list[str] | None = None) -> int:
    p = CLIParser(prog="python -m benchmarks.ptq_table", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir")
    p.add_argument("--bits", default="8,6,4")
    p.add_argument("--zeroq-iters", type=int, default=500)
    p.add_argument("--zeroq-images", type=int, default=64)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    res = run(resolve_data_dir(args.data_dir), [int(b) for b in args.bits.split(",")], args.zeroq_iters,
              args.zeroq_images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ptq_table.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "ptq_table.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
