"""`python -m lower.compile STUDENT --target llvm|cuda --out DIR`: student.pt -> integer graph -> TVM + ONNX.

STUDENT is a `student.pt` from `train.ptq` or `train.dfqf`. The artifact folder (lower.artifact) holds the
integer graph and parameters, the compiled TVM library, the ONNX QDQ export and a manifest. `--tune SECONDS`
times a few register tiles of each hand-scheduled conv kernel on this machine (`lower.tune`) and keeps the
fastest, saved as tuning.json in the artifact; `--tuning FILE` reuses such a file.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from train.errors import CLIParser, DFQFError, cli_main, positive_float
from train.models.registry import sha256_file
from train.student import load_student

from .artifact import LIBRARY, ONNX, TUNING, params_bytes, write_artifact
from .graph import IntGraph
from .integerize import integerize


def student_graph(path: Path) -> tuple[IntGraph, dict[str, Any]]:
    """Integer graph of a student.pt, with the checkpoint's provenance in graph.meta."""
    student, ckpt = load_student(path)
    inp = ckpt["input"]
    meta = {"arch": ckpt["arch"], "method": ckpt.get("method"), "data_free": ckpt.get("data_free"),
            "quant_config": ckpt["quant_config"], "mean": list(inp["mean"]), "std": list(inp["std"])}
    return integerize(student, inp["mean"], inp["std"], inp["size"], meta), ckpt


def bits_per_layer(graph: IntGraph) -> dict[str, dict[str, int]]:
    weights = {n.name: n.attrs["weight_bits"] for n in graph.nodes if n.op in ("conv2d", "dense")}
    acts = {n.name: graph.tensors[n.name].bits for n in graph.nodes if n.op in ("quantize_input", "requantize")}
    return {"weights": weights, "activations": acts}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("dfqf", "apache-tvm", "apache-tvm-ffi", "torch", "numpy", "onnx", "onnxruntime"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def compile_student(student: Path, target: str, out: Path, cuda_arch: str | None = None, onnx: bool = True,
                    overwrite: bool = False, onnx_fold_bias: bool = False, schedules: str = "auto",
                    tune: float | None = None, tuning: Path | None = None, log=lambda msg: None) -> dict[str, Any]:
    """The whole lowering; returns the manifest. schedules: as `lower.tvm_build.compile_graph`'s; the set
    it resolves to (or "none") is recorded in the manifest. tune: seconds to spend timing register tiles
    (`lower.tune`); tuning: an earlier tuning.json whose matching entries are used as they are."""
    from . import tune as tuner
    from .targets import NO_SCHEDULES, make_target, select_schedules  # TVM import is slow: lazily
    from .tvm_build import TARGETS, compile_graph, export_library, target_dict

    if target not in TARGETS:
        raise DFQFError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    opts = {"arch": cuda_arch} if cuda_arch and target == "cuda" else {}
    tvm_target = make_target(target, **opts)
    chosen = select_schedules(target, tvm_target, schedules)  # fail early
    schedules = chosen or NO_SCHEDULES
    given = tuner.load_tuning(tuning) if tuning is not None else None  # fail early on a bad file
    t0 = time.perf_counter()
    graph, ckpt = student_graph(student)
    log(f"integer graph: {len(graph.nodes)} nodes ({time.perf_counter() - t0:.1f} s)")
    tuned = None
    if tune or given is not None:
        requests = tuner.kernel_requests(graph, chosen)
        if not requests:
            log(f"tuning: target {target} with schedules {schedules} has no hand-scheduled conv kernels; "
                "nothing to tune")
        else:
            known = tuner.matching(given, requests) if given is not None else {}
            if given is not None:
                log(f"tuning: {len(known)} of {len(requests)} kernels from {tuning}"
                    + ("" if given.get("target") == str(tvm_target) else f" (tuned for {given.get('target')})"))
            tuned = tuner.tune(requests, tvm_target, tune or 0.0, known, log=log)
            s = tuner.summary(tuned)
            log(f"tuning: {s['tuned']} kernels timed, {s['from_file']} from file, {s['default']} default tile "
                f"({s['seconds']:.1f} s)")
    t1 = time.perf_counter()
    executable = compile_graph(graph, target, schedules=schedules, tiles=tuner.tiles(tuned) if tuned else None, **opts)
    compile_seconds = time.perf_counter() - t1
    log(f"TVM {target} build, schedules {schedules}: {compile_seconds:.1f} s")
    files = {LIBRARY: lambda p: export_library(executable, p)}
    if tuned is not None:
        files[TUNING] = lambda p: p.write_text(json.dumps(tuned, indent=1) + "\n")
    if onnx:
        from .onnx_export import save_onnx, to_onnx_qdq

        files[ONNX] = lambda p: save_onnx(to_onnx_qdq(graph, fold_bias=onnx_fold_bias), p)
    info = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "target": target, "target_dict": target_dict(target, **opts), "schedules": schedules,
            "versions": versions(),
            "student": {"path": str(student), "sha256": sha256_file(student), "arch": ckpt["arch"],
                        "method": ckpt.get("method"), "quant_config": ckpt["quant_config"]},
            "input": {"dtype": "uint8", "layout": "NHWC", "shape": ["N", *graph.input_shape]},
            "output": {"dtype": "int32", "classes": int(graph.tensors[graph.output].shape[-1]),
                       "real_logits": "int32 output * graph output scale (graph.json tensors[output].scale)"},
            "onnx": {"exported": onnx, "fold_bias": onnx_fold_bias} if onnx else {"exported": False},
            "bits": bits_per_layer(graph), "param_bytes": params_bytes(graph),
            "compile_seconds": round(compile_seconds, 2),
            **({"tuning": {**tuner.summary(tuned), "file": TUNING}} if tuned is not None else {})}
    manifest = write_artifact(out, graph, info, files, overwrite)
    log(f"wrote {out} ({time.perf_counter() - t0:.1f} s in all)")
    return manifest


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = CLIParser(prog="python -m lower.compile", description=__doc__.splitlines()[0])
    p.add_argument("student", type=Path, help="student.pt from train.ptq or train.dfqf")
    p.add_argument("--target", default="llvm", help="llvm (this CPU) or cuda")
    p.add_argument("--out", type=Path, help="artifact folder (default artifacts/<student folder>/<target>)")
    p.add_argument("--cuda-arch", help="CUDA architecture, e.g. sm_80 or sm_90 (default sm_80)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX QDQ export")
    p.add_argument("--onnx-fold-bias", action="store_true",
                   help="fold biases into int32 conv biases in the ONNX export: ORT fuses more convs into "
                        "QLinearConv, but its results drift from the integer graph by one code at some ties")
    p.add_argument("--schedules", default="auto",
                   help="hand-written kernels: auto (the best set this target's CPU features allow), none "
                        "(TVM's default loops), or a set of lower.targets.TARGETS, e.g. x86_vnni or x86_avx2")
    p.add_argument("--tune", type=positive_float, metavar="SECONDS",
                   help="time a few register tiles of each hand-scheduled conv kernel on this machine for at most "
                        "SECONDS and keep the fastest (saved as tuning.json in the artifact)")
    p.add_argument("--tuning", type=Path, metavar="FILE",
                   help="tuning.json of an earlier artifact: its entries for this graph's kernels are reused")
    p.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    args = p.parse_args(argv)
    if not args.student.is_file():
        raise DFQFError(f"student file not found: {args.student}")
    out = args.out or Path("artifacts") / args.student.resolve().parent.name / args.target
    manifest = compile_student(args.student, args.target, out, args.cuda_arch, not args.no_onnx, args.force,
                               args.onnx_fold_bias, args.schedules, args.tune, args.tuning,
                               log=lambda m: print(f"[lower.compile] {m}", file=sys.stderr, flush=True))
    print(f"{out}: {', '.join(sorted(manifest['files']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
