"""Post-training quantization baselines, under the same integer-deployable protocol as DFQF.

    python -m train.ptq --method {minmax,dfq,zeroq,recon,real-calib} --arch resnet20 --weights W \
        --wbits 4 --abits 4 --out DIR [--data-dir D]

Writes DIR/student.pt (the format lower.compile reads) and DIR/report.json (FP and quantized top-1 when a
data folder is given, time taken); the report is also the last stdout line. Methods:
  minmax      ranges from Gaussian-noise inputs (data-free, naive)
  dfq         Nagel et al. 2019: cross-layer equalization, BN-statistics ranges, bias correction (data-free)
  zeroq       Cai et al. 2020: images distilled from BN statistics, then ranges calibrated on them (data-free)
  recon       ZeroQ's images, then block reconstruction against the teacher (BRECQ/QDrop/Genie-style, data-free)
  real-calib  ranges calibrated on real training images — an upper bound, NOT data-free
"""
from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from core.cli import check_fields, cli_main, float_list, one_of, option, parse_options, positive
from core.errors import DFQFError
from core.files import sha256_file, write_json_atomic
from core.paths import optional_data_dir
from core.pixels import normalize

from .baselines.dfq import dfq_student
from .baselines.zeroq import distill_images
from .data import EVAL_DATA_HELP, evaluation_data, image_batches, load_split, subset
from .evaluate import evaluate_top1
from .models import get_arch, load_teacher, resolve_weights
from .models.registry import MEAN_HELP, MODEL_HELP, STD_HELP, ArchInfo, teacher_arch
from .quant.calibrate import OBSERVERS, calibrate
from .quant.convert import QuantConfig, QuantOptions, quantize_model
from .reconstruct import ReconstructionConfig, reconstruct
from .student import save_student


@dataclass
class PTQContext:
    """What a method may use: the teacher, its input contract, the protocol, and its own knobs."""

    teacher: nn.Module
    info: ArchInfo
    config: QuantConfig
    args: PTQOptions
    data_dir: Path | None
    distilled_images: torch.Tensor | None = None  # ZeroQ: set after distillation, reusable across bit widths


def _batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(torch.split(x, batch_size))


def minmax_method(ctx: PTQContext) -> tuple[fx.GraphModule, dict[str, Any]]:
    g = torch.Generator().manual_seed(ctx.args.seed)
    noise = torch.randn((ctx.args.calib_size, *ctx.info.input_size), generator=g)
    student = quantize_model(ctx.teacher, ctx.config)
    n = calibrate(student, _batches(noise, ctx.args.batch_size), ctx.args.observer)
    return student, {"calibration_images": n, "calibration_data": "gaussian noise N(0,1)"}


def dfq_method(ctx: PTQContext) -> tuple[fx.GraphModule, dict[str, Any]]:
    if ctx.config.protocol == "paper":
        raise DFQFError("--method dfq folds BN into the convs to equalize them: it has no --protocol paper "
                        "(BN unfolded); use another method")
    student, info = dfq_student(ctx.teacher, ctx.config, ctx.info.mean, ctx.info.std)
    return student, {"calibration_images": 0, "calibration_data": "BN statistics", **info}


def zeroq_method(ctx: PTQContext) -> tuple[fx.GraphModule, dict[str, Any]]:
    a = ctx.args
    start = time.perf_counter()
    if ctx.distilled_images is None:
        ctx.distilled_images = distill_images(
            ctx.teacher, a.calib_size, ctx.info.input_size, a.zeroq_iters, batch_size=a.batch_size, seed=a.seed,
            progress=_distill_progress(a.calib_size, a.zeroq_iters, a.batch_size))
    distill_s = time.perf_counter() - start
    student = quantize_model(ctx.teacher, ctx.config)
    n = calibrate(student, _batches(ctx.distilled_images, a.batch_size), a.observer)
    return student, {"calibration_images": n, "calibration_data": "ZeroQ distilled images",
                     "distill_iterations": a.zeroq_iters, "distill_seconds": round(distill_s, 2)}


def recon_method(ctx: PTQContext) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Genie-style data-free PTQ: ZeroQ's distilled images, calibration on them, then block reconstruction
    (AdaRound rounding, LSQ activation steps, QDrop) of every block against the teacher on the same images."""
    student, details = zeroq_method(ctx)
    start = time.perf_counter()
    blocks = reconstruct(student, ctx.teacher, ctx.distilled_images,
                         ReconstructionConfig(steps=ctx.args.recon_steps, seed=ctx.args.seed),
                         log=lambda m: print(f"recon {m}", file=sys.stderr, flush=True))
    return student, {**details, "calibration_data": "ZeroQ distilled images + block reconstruction",
                     "recon_steps": ctx.args.recon_steps, "recon_seconds": round(time.perf_counter() - start, 2),
                     "recon_blocks": blocks}


def real_calib_method(ctx: PTQContext) -> tuple[fx.GraphModule, dict[str, Any]]:
    if ctx.data_dir is None:
        raise DFQFError("--method real-calib needs real training images: pass --data-dir or set DFQF_DATA_DIR")
    x, _ = load_split(ctx.data_dir, ctx.info.dataset, "train")
    x, _ = subset(x, np.zeros(len(x), dtype=np.int64), ctx.args.calib_size, ctx.args.seed)
    images = normalize(x, ctx.info.mean, ctx.info.std).contiguous()
    student = quantize_model(ctx.teacher, ctx.config)
    n = calibrate(student, _batches(images, ctx.args.batch_size), ctx.args.observer)
    return student, {"calibration_images": n, "calibration_data": "real training images (NOT data-free)"}


METHODS: dict[str, tuple[Callable[[PTQContext], tuple[fx.GraphModule, dict[str, Any]]], bool]] = {
    "minmax": (minmax_method, True),
    "dfq": (dfq_method, True),
    "zeroq": (zeroq_method, True),
    "recon": (recon_method, True),
    "real-calib": (real_calib_method, False),
}


@dataclass(frozen=True)
class PTQOptions(QuantOptions):
    """A PTQ run (each field is also a flag of `python -m train.ptq`)."""

    method: str = option(help="quantization method", check=one_of(*METHODS))
    out: Path = option(help="output folder for student.pt and report.json")
    arch: str = option("resnet20", "architecture name (see train.models.ARCHS)")
    weights: Path | None = option(None, "teacher state_dict (default: the arch's default teacher)")
    model: Path | None = option(None, MODEL_HELP)
    mean: list[float] | None = option(None, MEAN_HELP, parse=float_list)
    std: list[float] | None = option(None, STD_HELP, parse=float_list)
    observer: str = option("minmax", "range estimator for minmax/zeroq/real-calib", check=one_of(*OBSERVERS))
    data_dir: Path | None = option(None, "evaluation data (default: $DFQF_DATA_DIR; optional)")
    split: str = option("test", "evaluation split")
    eval_data: Path | None = option(None, EVAL_DATA_HELP)
    eval_limit: int | None = option(None, "evaluate on a seeded random subset of this size", check=positive)
    calib_size: int = option(256, "calibration/distilled images", check=positive)
    zeroq_iters: int = option(500, "ZeroQ distillation steps per batch", check=positive)
    recon_steps: int = option(400, "recon: block reconstruction steps per block", check=positive)
    batch_size: int = option(64, "images per calibration batch", check=positive)
    seed: int = option(0, "random seed")

    def __post_init__(self) -> None:
        check_fields(self)



def _distill_progress(n: int, iters: int, batch: int) -> Callable[[int, int, float], None]:
    total = -(-n // batch) * iters
    done = [0]

    def report(start: int, it: int, loss: float) -> None:
        done[0] += 1
        if done[0] % 50 == 0 or done[0] == total:
            print(f"zeroq distill {done[0]}/{total} bn-loss {loss:.4f}", file=sys.stderr, flush=True)

    return report


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        raise DFQFError(f"cannot write to --out {out}: {e.strerror or e}") from None


def evaluate_pair(teacher: nn.Module, student: nn.Module, info: ArchInfo, data: tuple[np.ndarray, np.ndarray],
                  split: str) -> dict[str, Any]:
    """FP and quantized top-1 on the same images."""
    x, y = data
    fp, n = evaluate_top1(teacher, image_batches(x, y, info.mean, info.std, 500))
    q, _ = evaluate_top1(student, image_batches(x, y, info.mean, info.std, 500))
    return {"fp_top1": round(fp, 2), "quant_top1": round(q, 2), "eval_images": n, "split": split}


def run(args: PTQOptions) -> dict[str, Any]:
    """Quantize the teacher with `args.method`; writes OUT/student.pt and OUT/report.json, returns the report."""
    torch.manual_seed(args.seed)
    arch = teacher_arch(args.arch, args.weights, args.model, args.mean, args.std)  # --model registers one
    info = get_arch(arch)
    config = args.quant_config()
    out = Path(args.out)
    _check_out(out)
    data_dir = optional_data_dir(args.data_dir)
    # read before quantizing: a bad data folder fails before any work
    eval_data = evaluation_data(info.dataset, info.input_size, info.num_classes, data_dir, args.split,
                                args.eval_data, args.eval_limit, args.seed)
    weights = resolve_weights(arch, args.weights)
    teacher = load_teacher(arch, weights)
    teacher_file = args.model or weights
    method, data_free = METHODS[args.method]

    start = time.perf_counter()
    student, details = method(PTQContext(teacher, info, config, args, data_dir))
    seconds = time.perf_counter() - start

    meta = {"teacher": str(teacher_file) if teacher_file else None,
            "teacher_sha256": sha256_file(teacher_file) if teacher_file else None,
            "torch": str(torch.__version__), "python": platform.python_version(), "seed": args.seed}
    save_student(out / "student.pt", student, arch, info.num_classes, config, args.method, data_free, meta)
    report: dict[str, Any] = {
        "method": args.method, "data_free": data_free, "arch": arch, **config.to_dict(),
        "observer": args.observer if args.method != "dfq" else "bn-statistics",
        "quantize_seconds": round(seconds, 2), **details, **meta,
    }
    if eval_data is not None:
        report.update(evaluate_pair(teacher, student, info, eval_data, args.split))
    write_json_atomic(report, out / "report.json")
    return report


@cli_main
def main(argv: list[str] | None = None) -> int:
    print(json.dumps(run(parse_options(PTQOptions, argv, "python -m train.ptq", __doc__.splitlines()[0]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
