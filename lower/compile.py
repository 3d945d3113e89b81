"""`python -m lower.compile STUDENT --target llvm|cuda --out DIR`: student.pt -> integer graph -> TVM + ONNX.

STUDENT is a `student.pt` from `train.ptq` or `train.dfqf`. The artifact folder (lower.artifact) holds the
integer graph and parameters, the compiled TVM library, the ONNX QDQ exports (exact and fast variants) and a
manifest; `--for-ort` restructures the integer graph as ONNX Runtime's fused int8 kernels compute it.
`--tune SECONDS` times a few register tiles of each hand-scheduled conv kernel on this machine (`lower.tune`)
and keeps the fastest, saved as tuning.json in the artifact; `--tuning FILE` reuses such a file.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.cli import check_fields, cli_main, option, parse_options, positive, str_list
from core.errors import DFQFError
from core.files import sha256_file
from train.student import load_student

from .artifact import LIBRARY, ONNX_FILES, TUNING, ArtifactWriter, params_bytes
from .graph import IntGraph
from .integerize import integerize
from .ort_graph import for_ort


def student_graph(path: Path) -> tuple[IntGraph, dict[str, Any]]:
    """Integer graph of a student.pt, with the checkpoint's provenance in graph.meta."""
    student, ckpt = load_student(path)
    if ckpt["quant_config"].get("protocol", "integer") != "integer":
        raise DFQFError(f"{path} is a --protocol {ckpt['quant_config']['protocol']} student (BN unfolded, float "
                        f"residual sums): fake-quant only, it has no integer graph; quantize with --protocol integer")
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


@dataclass(frozen=True)
class CompileOptions:
    """What `compile_student` builds (each field is also a flag of `python -m lower.compile`)."""

    student: Path = option(help="student.pt from train.ptq or train.dfqf", positional=True)
    target: str = option("llvm", "llvm (this CPU) or cuda")
    out: Path | None = option(None, "artifact folder (default artifacts/<student folder>/<target>)")
    cuda_arch: str | None = option(None, "CUDA architecture, e.g. sm_80 or sm_90 (default sm_80)")
    mcpu: str | None = option(None, "llvm: build for this LLVM CPU name instead of this host (e.g. sapphirerapids, "
                              "x86-64-v3); default: this host's name and, as mattr, the features it really has")
    mattr: list[str] | None = option(None, "llvm: LLVM features to add or remove, e.g. +amx-int8,-avx512f",
                                     parse=str_list)
    onnx: bool = option(True, "skip the ONNX QDQ export", flag="--no-onnx", switch=True)
    for_ort: bool = option(False, "structure the integer graph as ONNX Runtime's fused int8 kernels compute it "
                           "(biases in the int32 accumulators, residual convs rounded to int8 before the add; "
                           "lower.ort_graph): the fast ONNX export then agrees with it, TVM runs the same graph",
                           switch=True)
    schedules: str = option("auto", "hand-written kernels: auto (the best set this target's CPU features allow), "
                            "none (TVM's default loops), or a set of lower.targets.TARGETS, e.g. x86_amx, x86_vnni "
                            "or x86_avx2")
    tune: float | None = option(None, "time a few register tiles of each hand-scheduled conv kernel on this machine "
                                "for at most SECONDS and keep the fastest (saved as tuning.json in the artifact)",
                                check=positive, metavar="SECONDS")
    tuning: Path | None = option(None, "tuning.json of an earlier artifact: its entries for this graph's kernels "
                                 "are reused", metavar="FILE")
    force: bool = option(False, "replace an existing artifact folder", switch=True)

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def out_dir(self) -> Path:
        return self.out or Path("artifacts") / self.student.resolve().parent.name / self.target


def compile_student(opts: CompileOptions, log=lambda msg: None) -> dict[str, Any]:
    """The whole lowering of `opts.student` into the artifact folder `opts.out_dir`; returns the manifest.
    The schedule set `opts.schedules` resolves to (or "none") is recorded in the manifest; `opts.tune`:
    seconds to spend timing register tiles (`lower.tune`); `opts.tuning`: an earlier tuning.json whose
    matching entries are used as they are."""
    from . import tune as tuner
    from .targets import (  # TVM: lazily
        NO_SCHEDULES,
        TARGETS,
        make_target,
        required_features,
        select_schedules,
        target_dict,
    )
    from .tvm_build import compile_graph, export_library

    target = opts.target
    if target not in TARGETS:
        raise DFQFError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    if not opts.student.is_file():
        raise DFQFError(f"student file not found: {opts.student}")
    target_opts: dict[str, Any] = {"arch": opts.cuda_arch} if opts.cuda_arch and target == "cuda" else {}
    if target == "llvm":
        target_opts.update({k: v for k, v in (("mcpu", opts.mcpu), ("mattr", opts.mattr)) if v is not None})
    elif opts.mcpu or opts.mattr:
        raise DFQFError("--mcpu/--mattr apply to the llvm target only")
    tvm_target = make_target(target, **target_opts)
    chosen = select_schedules(target, tvm_target, opts.schedules)  # fail early
    schedules = chosen.name if chosen is not None else NO_SCHEDULES
    given = tuner.load_tuning(opts.tuning) if opts.tuning is not None else None  # fail early on a bad file
    with ArtifactWriter(opts.out_dir, opts.force) as writer:  # --out is claimed (and checked) before the build
        t0 = time.perf_counter()
        graph, ckpt = student_graph(opts.student)
        if opts.for_ort:
            graph = for_ort(graph)
        log(f"integer graph: {len(graph.nodes)} nodes ({time.perf_counter() - t0:.1f} s)")
        tuned = None
        if opts.tune or given is not None:
            requests = tuner.kernel_requests(graph, chosen)
            if not requests:
                log(f"tuning: target {target} with schedules {schedules} has no hand-scheduled conv kernels; "
                    "nothing to tune")
            else:
                known = tuner.matching(given, requests) if given is not None else {}
                if given is not None:
                    log(f"tuning: {len(known)} of {len(requests)} kernels from {opts.tuning}"
                        + ("" if given.get("target") == str(tvm_target) else f" (tuned for {given.get('target')})"))
                tuned = tuner.tune(requests, tvm_target, opts.tune or 0.0, known, log=log)
                s = tuner.summary(tuned)
                log(f"tuning: {s['tuned']} kernels timed, {s['from_file']} from file, {s['default']} default tile "
                    f"({s['seconds']:.1f} s)")
        t1 = time.perf_counter()
        executable = compile_graph(graph, target, schedules=schedules, tiles=tuner.tiles(tuned) if tuned else None,
                                   **target_opts)
        compile_seconds = time.perf_counter() - t1
        log(f"TVM {target} build, schedules {schedules}: {compile_seconds:.1f} s")
        files = {LIBRARY: lambda p: export_library(executable, p)}
        if tuned is not None:
            files[TUNING] = lambda p: p.write_text(json.dumps(tuned, indent=1) + "\n")
        if opts.onnx:
            from .onnx_export import VARIANTS, save_onnx, to_onnx_qdq

            for variant, name in ONNX_FILES.items():
                files[name] = lambda p, v=variant: save_onnx(to_onnx_qdq(graph, **VARIANTS[v]), p)
        info = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "target": target, "target_dict": target_dict(target, **target_opts), "schedules": schedules,
                "isa_features": required_features(tvm_target),
                "versions": versions(),
                "student": {"path": str(opts.student), "sha256": sha256_file(opts.student), "arch": ckpt["arch"],
                            "method": ckpt.get("method"), "quant_config": ckpt["quant_config"]},
                "input": {"dtype": "uint8", "layout": "NHWC", "shape": ["N", *graph.input_shape]},
                "output": {"dtype": "int32", "classes": int(graph.tensors[graph.output].shape[-1]),
                           "real_logits": "int32 output * graph output scale (graph.json tensors[output].scale)"},
                "graph_structure": "ort" if opts.for_ort else "default",
                "onnx": {"exported": True, "variants": ONNX_FILES} if opts.onnx else {"exported": False},
                "bits": bits_per_layer(graph), "param_bytes": params_bytes(graph),
                "compile_seconds": round(compile_seconds, 2),
                **({"tuning": {**tuner.summary(tuned), "file": TUNING}} if tuned is not None else {})}
        manifest = writer.write(graph, info, files)
    log(f"wrote {opts.out_dir} ({time.perf_counter() - t0:.1f} s in all)")
    return manifest


@cli_main
def main(argv: list[str] | None = None) -> int:
    opts = parse_options(CompileOptions, argv, "python -m lower.compile", __doc__.splitlines()[0])
    manifest = compile_student(opts, log=lambda m: print(f"[lower.compile] {m}", file=sys.stderr, flush=True))
    print(f"{opts.out_dir}: {', '.join(sorted(manifest['files']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
