"""`python -m runtime.parity ARTIFACT --data-dir D [--split test|lossless932]`: does the deployed integer
model compute what was trained?

Runs, on the same images: the FP teacher, the fake-quant student, the NumPy integer reference, the TVM
module and the ONNX QDQ export under ONNX Runtime. Progress goes to stderr; the last stdout line is a JSON
object (then also written to ARTIFACT/parity.json, or --json-out): top-1 of each, integer-vs-fake-quant top-1
agreement (also against the student evaluated in float64, which has no float32 rounding noise), whether TVM
equals the reference bit for bit, and per quantized layer the largest difference, in codes, between the
integer graph and the fake-quant student (end to end, and with each layer fed the student's codes:
`isolated`), and the seconds each engine took. An architecture without an evaluation data set (tinynet) is
compared on seeded random images (no top-1, agreements only).

Everything is checked before the work starts: the artifact, the student (it must be the one the artifact was
compiled from: same sha256), the teacher, the data and that the report can be written.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.cli import check_fields, check_report_path, cli_main, emit_report, one_of, option, parse_options, positive
from core.errors import DFQFError
from core.files import sha256_file
from core.paths import resolve_data_dir
from core.pixels import normalize
from lower.artifact import GRAPH, LIBRARY, ONNX_FILES, PARAMS, read_manifest
from lower.reference import run_graph
from train.data import load_split, read_eval_data, subset
from train.models import get_arch, load_teacher
from train.models.registry import ArchInfo
from train.student import load_student

from .compare import LayerDiffs, fakequant_values, isolated_layer_diffs, student_codes
from .model import load
from .ort import OrtCodes

ORT_KEYS = {"exact": "ort", "fast": "ort_fast"}  # ONNX variant -> its name among the engines
RANDOM_IMAGES = 1000  # images of a parity run on an architecture without an evaluation data set


class Tally:
    def __init__(self) -> None:
        self.correct: dict[str, int] = {}
        self.agree: dict[str, int] = {}
        self.n = 0

    def update(self, labels: np.ndarray | None, logits: dict[str, np.ndarray]) -> None:
        pred = {k: v.argmax(1) for k, v in logits.items()}
        for k, p in pred.items():
            if labels is not None:
                self.correct[k] = self.correct.get(k, 0) + int((p == labels).sum())
            if k != "fakequant":
                self.agree[k] = self.agree.get(k, 0) + int((p == pred["fakequant"]).sum())
        # against the student evaluated in float64: its float32 rounding noise flips rare ties, which
        # then cascade; float64 isolates what the integer lowering itself changes
        if "fakequant_fp64" in pred:
            self.agree["integer_fp64"] = self.agree.get("integer_fp64", 0) + int(
                (pred["integer"] == pred["fakequant_fp64"]).sum())
        self.n += len(pred["integer"])

    def count(self, key: str, n: int) -> None:
        self.agree[key] = self.agree.get(key, 0) + n

    def top1(self, k: str) -> float | None:
        return round(100.0 * self.correct[k] / self.n, 2) if k in self.correct and self.n else None

    def agreement(self, k: str) -> float | None:
        return round(self.agree[k] / self.n, 5) if k in self.agree and self.n else None


@dataclass(frozen=True)
class ParityOptions:
    """What `parity` compares (each field is also a flag of `python -m runtime.parity`)."""

    artifact: Path = option(help="artifact folder from lower.compile", positional=True)
    data_dir: Path | None = option(None, "folder with cifar10/ (default $DFQF_DATA_DIR)")
    split: str = option("test", "evaluation split", check=one_of("test", "lossless932"))
    eval_data: Path | None = option(None, "your own labelled images instead: an .npz (x uint8 NHWC, y) or an "
                                    "ImageFolder tree")
    limit: int | None = option(None, "a seeded subset of this many images (random images: how many, default "
                               f"{RANDOM_IMAGES})", check=positive)
    batch: int = option(50, "images per batch (small batches stay in the caches: 50 is 3x faster than 1000)",
                        check=positive)
    student: Path | None = option(None, "student.pt (default: the one recorded in the manifest; it must be the "
                                  "student the artifact was compiled from)")
    teacher: Path | None = option(None, "FP teacher weights (default: the student's teacher)")
    onnx: bool = option(True, "skip ONNX Runtime", flag="--no-onnx", switch=True)
    fp64_all: bool = option(False, "evaluate the float64 student on every image (slow: about 0.9 s per 100 "
                            "ResNet20 images); by default only on the images where the integer graph and the "
                            "float32 student disagree", switch=True)
    json_out: Path | None = option(None, "where the report goes (default ARTIFACT/parity.json)")

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def report_path(self) -> Path:
        return self.json_out or self.artifact / "parity.json"


class Timer:
    """Seconds spent per engine, summed over the batches."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return out

    def report(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.seconds.items()}


def images(o: ParityOptions, info: ArchInfo, num_classes: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(uint8 NHWC images, labels or None, what they are)."""
    dataset, (c, h, w) = info.dataset, info.input_size
    if o.eval_data is not None:
        x, y = read_eval_data(o.eval_data, info.input_size, num_classes, o.limit)
        return x, y, f"{len(x)} images of {o.eval_data}"
    if dataset not in ("cifar10", "cifar100"):
        shape = (h, w, c)
        n = o.limit or RANDOM_IMAGES
        x = np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)
        return x, None, f"{n} seeded random images (the {dataset} architecture has no evaluation data set)"
    data_dir = resolve_data_dir(o.data_dir)
    x, y = load_split(data_dir, dataset, o.split)
    if o.limit is not None:
        x, y = subset(x, y, o.limit, 0)
    return x, np.asarray(y), f"{dataset} {o.split} ({data_dir})"


def onnx_report(variant: str, tally: Tally, diffs: LayerDiffs) -> dict[str, Any]:
    """One ONNX variant's result: its top-1, its top-1 agreement with the integer graph, and how far its
    codes are from the integer graph's, layer by layer."""
    layers = diffs.report()
    return {"file": ONNX_FILES[variant], "top1": tally.top1(ORT_KEYS[variant]),
            "top1_agreement_with_integer": tally.agreement(f"{ORT_KEYS[variant]}_vs_integer"),
            "max_code_diff": max((r["max_lsb"] for r in layers.values()), default=0),
            "max_code_diff_per_layer": {k: r["max_lsb"] for k, r in layers.items()},
            "mismatch_fraction_per_layer": {k: round(r["mismatch_fraction"], 6) for k, r in layers.items()}}


def parity(o: ParityOptions, log=lambda msg: None) -> dict[str, Any]:
    artifact, batch, teacher_path = o.artifact, o.batch, o.teacher
    manifest = read_manifest(artifact, required=(GRAPH, PARAMS, LIBRARY))
    compiled_from = manifest.get("student", {})
    student_path = o.student or Path(compiled_from.get("path", ""))
    if not student_path.is_file():
        raise DFQFError(f"the student {student_path} recorded in the manifest is not here: pass --student")
    if sha256_file(student_path) != compiled_from.get("sha256"):
        raise DFQFError(f"{student_path} is not the student {artifact} was compiled from (its sha256 differs "
                        f"from the manifest's)")
    student, ckpt = load_student(student_path)
    student64 = copy.deepcopy(student).double()
    recorded = ckpt.get("meta", {}).get("teacher")
    if teacher_path is None and recorded and Path(recorded).is_file():
        teacher_path = Path(recorded)
    if teacher_path is None:  # the arch's default teacher; say so, it may not be the student's teacher
        log(f"the student's teacher {recorded} is not here: using {ckpt['arch']}'s default weights "
            "(pass --teacher for the right FP baseline)")
    teacher = load_teacher(ckpt["arch"], teacher_path, **ckpt.get("arch_kwargs", {})).eval()
    info = get_arch(ckpt["arch"])
    model = load(artifact)
    g = model.graph
    x_all, y_all, source = images(o, info, ckpt["arch_kwargs"].get("num_classes", info.num_classes))
    onnx = {v: OrtCodes(artifact / f, g) for v, f in ONNX_FILES.items()  # 1 thread: no spinning pool
            if o.onnx and f in manifest["files"]}
    onnx_diffs = {v: LayerDiffs(g, run.tensors) for v, run in onnx.items()}
    tally, diffs, timer = Tally(), LayerDiffs(g), Timer()
    isolated: dict[str, int] = {}
    tvm_equal, t0 = True, time.perf_counter()
    mean, std = g.meta.get("mean", info.mean), g.meta.get("std", info.std)
    names = set(diffs.names) | {g.output}
    for start in range(0, len(x_all), batch):
        x = x_all[start:start + batch]
        y = None if y_all is None else y_all[start:start + batch]
        xn = normalize(x, mean, std).contiguous()
        with torch.inference_mode():
            fp = timer("teacher", teacher, xn).numpy()
            fq = timer("fakequant", fakequant_values, student, xn, names)
        codes = timer("layer_diffs", student_codes, g, fq)
        ints: dict[str, np.ndarray] = {}
        ref = timer("reference", run_graph, g, x, ints.__setitem__)
        for k, v in timer("reference_isolated", isolated_layer_diffs, g, codes, x).items():
            if k in diffs.names:
                isolated[k] = max(isolated.get(k, 0), v)
        tvm = timer("tvm", model.predict_int, x)
        tvm_equal = tvm_equal and np.array_equal(tvm, ref)
        timer("layer_diffs", diffs.update, codes, ints)
        logits = {"fp": fp, "fakequant": fq[g.output].numpy(), "reference": ref * g.output_scale,
                  "integer": tvm * g.output_scale}
        differ = np.flatnonzero(logits["integer"].argmax(1) != logits["fakequant"].argmax(1))
        fp64_rows = np.arange(len(x)) if o.fp64_all else differ
        if len(fp64_rows):
            with torch.inference_mode():
                fq64 = timer("fakequant_fp64", student64, xn[fp64_rows].double()).numpy()
            tally.count("fp64_images", len(fp64_rows))
            if o.fp64_all:
                logits["fakequant_fp64"] = fq64
            tally.count("disagreements", len(differ))
            tally.count("disagreements_fp64_with_integer",
                        int((fq64.argmax(1) == logits["integer"].argmax(1)[fp64_rows])[np.isin(fp64_rows, differ)].sum()))
        for v, run in onnx.items():
            key = ORT_KEYS[v]
            logits[key], codes_ort = timer(key, run, x)
            tally.count(f"{key}_vs_integer", int((logits[key].argmax(1) == logits["integer"].argmax(1)).sum()))
            onnx_diffs[v].update(codes_ort, ints)
        tally.update(y, logits)
        log(f"{tally.n}/{len(x_all)} images, integer {tally.top1('integer')} fake-quant {tally.top1('fakequant')} "
            f"agreement {tally.agreement('integer')} tvm==reference {tvm_equal} ({time.perf_counter() - t0:.0f} s)")
    report = diffs.report()
    return {"artifact": str(artifact), "target": manifest.get("target"), "images": source, "split": o.split,
            "n": tally.n, "teacher": str(teacher_path) if teacher_path else f"default {ckpt['arch']} weights",
            "fp_top1": tally.top1("fp"), "fakequant_top1": tally.top1("fakequant"),
            "integer_top1": tally.top1("integer"), "reference_top1": tally.top1("reference"),
            "ort_top1": tally.top1("ort"), "ort_fast_top1": tally.top1("ort_fast"),
            "fakequant_fp64_top1": tally.top1("fakequant_fp64"),
            "top1_agreement": tally.agreement("integer"),
            "top1_agreement_vs_fp64_fakequant": tally.agreement("integer_fp64"),
            "ort_top1_agreement": tally.agreement("ort"), "tvm_equals_reference": bool(tvm_equal),
            "onnx": {v: onnx_report(v, tally, onnx_diffs[v]) for v in onnx},
            "disagreements": tally.agree.get("disagreements", 0),
            "disagreements_where_fp64_student_agrees_with_integer": tally.agree.get("disagreements_fp64_with_integer", 0),
            "fp64_images": tally.agree.get("fp64_images", 0),
            "max_lsb_diff_per_layer": {k: r["max_lsb"] for k, r in report.items()},
            "mismatch_fraction_per_layer": {k: round(r["mismatch_fraction"], 6) for k, r in report.items()},
            "isolated_max_lsb_diff_per_layer": isolated, "seconds": round(time.perf_counter() - t0, 1),
            "seconds_per_engine": timer.report(), "torch_threads": torch.get_num_threads()}


@cli_main
def main(argv: list[str] | None = None) -> int:
    o = parse_options(ParityOptions, argv, "python -m runtime.parity", __doc__.splitlines()[0])
    if not (o.artifact / "manifest.json").is_file():
        read_manifest(o.artifact)  # the clear "not an artifact" error before anything else
    check_report_path(o.report_path, "the report (--json-out)")
    emit_report(parity(o, log=lambda m: print(f"[parity] {m}", file=sys.stderr, flush=True)), o.report_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
