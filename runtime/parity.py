"""`python -m runtime.parity ARTIFACT --data-dir D [--split test|lossless932]`: does the deployed integer
model compute what was trained?

Runs, on the same images: the FP teacher, the fake-quant student, the NumPy integer reference, the TVM
module and the ONNX QDQ export under ONNX Runtime. Progress goes to stderr; the last stdout line is a JSON
object (also written to ARTIFACT/parity.json): top-1 of each, integer-vs-fake-quant top-1 agreement (also
against the student evaluated in float64, which has no float32 rounding noise),
whether TVM equals the reference bit for bit, and per quantized layer the largest difference, in codes,
between the integer graph and the fake-quant student (end to end, and with each layer fed the student's
codes: `isolated`).
"""
from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.cli import check_fields, cli_main, one_of, option, parse_options, positive
from core.errors import DFQFError
from core.files import write_json_atomic
from core.paths import resolve_data_dir
from core.pixels import normalize
from lower.artifact import read_manifest
from lower.reference import run_graph
from train.data import load_split, subset
from train.models import get_arch, load_teacher
from train.student import load_student

from .compare import LayerDiffs, fakequant_values, isolated_layer_diffs
from .model import load, load_onnx


class Tally:
    def __init__(self) -> None:
        self.correct: dict[str, int] = {}
        self.agree: dict[str, int] = {}
        self.n = 0

    def update(self, labels: np.ndarray, logits: dict[str, np.ndarray]) -> None:
        pred = {k: v.argmax(1) for k, v in logits.items()}
        for k, p in pred.items():
            self.correct[k] = self.correct.get(k, 0) + int((p == labels).sum())
            if k != "fakequant":
                self.agree[k] = self.agree.get(k, 0) + int((p == pred["fakequant"]).sum())
        # against the student evaluated in float64: its float32 rounding noise flips rare ties, which
        # then cascade; float64 isolates what the integer lowering itself changes
        self.agree["integer_fp64"] = self.agree.get("integer_fp64", 0) + int(
            (pred["integer"] == pred["fakequant_fp64"]).sum())
        self.n += len(labels)

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
    limit: int | None = option(None, "a seeded subset of this many images", check=positive)
    batch: int = option(250, "images per batch", check=positive)
    student: Path | None = option(None, "student.pt (default: the one recorded in the manifest)")
    teacher: Path | None = option(None, "FP teacher weights (default: the student's teacher)")
    onnx: bool = option(True, "skip ONNX Runtime", flag="--no-onnx", switch=True)

    def __post_init__(self) -> None:
        check_fields(self)


def parity(o: ParityOptions, log=lambda msg: None) -> dict[str, Any]:
    artifact, split, batch, teacher_path = o.artifact, o.split, o.batch, o.teacher
    data_dir = resolve_data_dir(o.data_dir)
    manifest = read_manifest(artifact)
    student_path = o.student or Path(manifest["student"]["path"])
    if not student_path.is_file():
        raise DFQFError(f"the student {student_path} recorded in the manifest is not here: pass --student")
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
    ort = load_onnx(artifact) if o.onnx and "model.onnx" in manifest["files"] else None
    g = model.graph
    x_all, y_all = load_split(data_dir, info.dataset, split)
    if o.limit is not None:
        x_all, y_all = subset(x_all, y_all, o.limit, 0)
    tally, diffs = Tally(), LayerDiffs(g)
    isolated: dict[str, int] = {}
    tvm_equal, t0 = True, time.perf_counter()
    mean, std = g.meta.get("mean", info.mean), g.meta.get("std", info.std)
    for start in range(0, len(x_all), batch):
        x, y = x_all[start:start + batch], np.asarray(y_all[start:start + batch])
        xn = normalize(x, mean, std).contiguous()
        with torch.no_grad():
            fp = teacher(xn).numpy()
        fq = fakequant_values(student, xn, set(diffs.names) | {g.output})
        ints: dict[str, np.ndarray] = {}
        ref = run_graph(g, x, observe=ints.__setitem__)
        tvm = model.predict_int(x)
        tvm_equal = tvm_equal and np.array_equal(tvm, ref)
        diffs.update(fq, ints)
        for k, v in isolated_layer_diffs(g, fq, x).items():
            if k in diffs.names:
                isolated[k] = max(isolated.get(k, 0), v)
        with torch.no_grad():
            fq64 = student64(xn.double()).numpy()
        logits = {"fp": fp, "fakequant": fq[g.output].numpy(), "fakequant_fp64": fq64,
                  "reference": ref * g.output_scale, "integer": tvm * g.output_scale}
        if ort is not None:
            logits["ort"] = ort.predict(x)
        tally.update(y, logits)
        log(f"{tally.n}/{len(x_all)} images, integer {tally.top1('integer')} fake-quant {tally.top1('fakequant')} "
            f"agreement {tally.agreement('integer')} tvm==reference {tvm_equal} ({time.perf_counter() - t0:.0f} s)")
    report = diffs.report()
    return {"artifact": str(artifact), "target": manifest.get("target"), "split": split, "n": tally.n,
            "teacher": str(teacher_path) if teacher_path else f"default {ckpt['arch']} weights",
            "fp_top1": tally.top1("fp"), "fakequant_top1": tally.top1("fakequant"),
            "integer_top1": tally.top1("integer"), "reference_top1": tally.top1("reference"),
            "ort_top1": tally.top1("ort"), "fakequant_fp64_top1": tally.top1("fakequant_fp64"),
            "top1_agreement": tally.agreement("integer"),
            "top1_agreement_vs_fp64_fakequant": tally.agreement("integer_fp64"),
            "ort_top1_agreement": tally.agreement("ort"), "tvm_equals_reference": bool(tvm_equal),
            "max_lsb_diff_per_layer": {k: r["max_lsb"] for k, r in report.items()},
            "mismatch_fraction_per_layer": {k: round(r["mismatch_fraction"], 6) for k, r in report.items()},
            "isolated_max_lsb_diff_per_layer": isolated, "seconds": round(time.perf_counter() - t0, 1)}


@cli_main
def main(argv: list[str] | None = None) -> int:
    o = parse_options(ParityOptions, argv, "python -m runtime.parity", __doc__.splitlines()[0])
    result = parity(o, log=lambda m: print(f"[parity] {m}", file=sys.stderr, flush=True))
    write_json_atomic(result, o.artifact / "parity.json")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
