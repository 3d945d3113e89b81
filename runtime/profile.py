"""`python -m runtime.profile ARTIFACT [--batch 1] [--threads 1]`: where the integer model's time goes, per kernel.

One call of the compiled `main` runs with a VM instrument that records every kernel call (the TIR functions;
the VM's own builtins — allocation, shape checks — are not kernels) with its argument tensors. Each recorded
call is then re-run on its own arguments and timed (best of `--repeat` rounds, each long enough to be
measured), and the table lists, per kernel function, its calls, total time and share, the integer MACs of
its hand-scheduled conv calls and their GMAC/s. The difference between the end-to-end time of `main` and the
sum of its kernels is the VM's own overhead (allocation, argument passing).

Kernels keep the name of the first graph node they were built for (identical kernels are deduplicated by
TVM: `layer1_0_conv1_conv2d_vnni` may also run layer1.1's and layer1.2's conv1). The last stdout line is
the JSON of the table.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.cli import check_fields, cli_main, option, parse_options, positive

BUILTIN_PREFIXES = ("vm.builtin.", "shape_func")


def _best_seconds(fn, repeat: int, min_round: float = 0.01) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    number = max(1, int(min_round / once))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def record_kernel_calls(model, pixels: np.ndarray) -> list[tuple[str, Any, list[Any]]]:
    """(symbol, function, arguments) of every kernel call of one `main` run, in order."""
    import tvm

    calls: list[tuple[str, Any, list[Any]]] = []

    def instrument(func, symbol, before_run, ret_value, *args):
        if before_run and not symbol.startswith(BUILTIN_PREFIXES):
            calls.append((symbol, func, list(args)))
        return 0  # VMInstrumentReturnKind.kNoOp: run the call

    vm = model.executable.vm
    vm.set_instrument(tvm.runtime.convert(instrument))
    try:
        model.executable(pixels, model.params)
    finally:
        vm.set_instrument(None)
    return calls


def kernel_macs(symbol: str, args: list[Any]) -> int:
    """MACs one call of a hand-scheduled x86 conv kernel does (`lower.schedules`): its output [n, OH, OW, O_pad]
    times the taps per output of its packed weight, padded channels included (the kernel computes them):
    kh * kw * Cin4 of int8 [O/16, kh, kw, Cin4/4, 16, 4] (VNNI) or int16 [O/8, kh, kw, Cin4/4, 2, 8, 2] (AVX2),
    whose second-to-last axis is the output lanes; kh * kw of a depthwise kernel's int16 [kh, kw, C/lanes,
    lanes]; 0 for any other kernel."""
    shapes = [tuple(int(d) for d in a.shape) for a in args if hasattr(a, "shape")]
    if not shapes or len(shapes[-1]) != 4:
        return 0
    if "depthwise" in symbol:
        weight = next((s for s, a in zip(shapes, args) if len(s) == 4 and str(a.dtype) == "int16"), None)
        return int(np.prod(shapes[-1])) * weight[0] * weight[1] if weight else 0
    weights = [s for s, a in zip(shapes, args) if len(s) in (6, 7) and str(a.dtype) in ("int8", "int16")]
    if not weights:
        return 0
    w = weights[0]
    return int(np.prod(shapes[-1])) * int(np.prod(w[1:])) // w[-2]


def profile(artifact: Path, batch: int, repeat: int) -> dict[str, Any]:
    from .model import load

    model = load(artifact)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, *model.graph.input_shape), dtype=np.uint8)
    end_to_end = _best_seconds(lambda: model.executable(pixels, model.params), repeat)
    calls = record_kernel_calls(model, pixels)
    rows: dict[str, dict[str, Any]] = {}
    for symbol, func, args in calls:
        seconds = _best_seconds(lambda: func(*args), repeat)
        row = rows.setdefault(symbol, {"kernel": symbol, "calls": 0, "ms": 0.0, "macs": 0})
        row["calls"] += 1
        row["ms"] += seconds * 1e3
        row["macs"] += kernel_macs(symbol, args)
    total = sum(r["ms"] for r in rows.values())
    table = sorted(rows.values(), key=lambda r: -r["ms"])
    for r in table:
        r["share"] = r["ms"] / total if total else 0.0
        r["gmac_s"] = r["macs"] / (r["ms"] * 1e-3) / 1e9 if r["macs"] and r["ms"] else None
        r["ms"] = round(r["ms"], 4)
    from .executable import cpu_threads

    # the threads the calls ran on: all of TVM's pool, or one for a batch below the parallel threshold
    return {"artifact": str(artifact), "batch": batch, "threads": cpu_threads(),
            "end_to_end_ms": round(end_to_end * 1e3, 4), "kernels_ms": round(total, 4),
            "overhead_ms": round(end_to_end * 1e3 - total, 4), "kernel_calls": len(calls), "table": table}


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{report['artifact']}: batch {report['batch']}, end to end {report['end_to_end_ms']:.3f} ms = "
             f"kernels {report['kernels_ms']:.3f} ms ({report['kernel_calls']} calls) + VM "
             f"{report['overhead_ms']:.3f} ms",
             f"{'kernel':64s} {'calls':>5s} {'ms':>9s} {'share':>6s} {'GMAC/s':>7s}"]
    for r in report["table"]:
        gmac = f"{r['gmac_s']:7.1f}" if r["gmac_s"] else " " * 7
        lines.append(f"{r['kernel'][:64]:64s} {r['calls']:5d} {r['ms']:9.4f} {r['share'] * 100:5.1f}% {gmac}")
    return "\n".join(lines)


@dataclass(frozen=True)
class ProfileOptions:
    artifact: Path = option(help="artifact folder from lower.compile (llvm target)", positional=True)
    batch: int = option(1, "images per call", check=positive)
    threads: int = option(1, "TVM threads (set before TVM starts)", check=positive)
    repeat: int = option(5, "timed rounds per kernel (best is kept)", check=positive)

    def __post_init__(self) -> None:
        check_fields(self)


@cli_main
def main(argv: list[str] | None = None) -> int:
    o = parse_options(ProfileOptions, argv, "python -m runtime.profile", __doc__.split("\n\n")[0])
    os.environ["TVM_NUM_THREADS"] = str(o.threads)  # read when TVM's thread pool starts (first kernel call)
    report = profile(o.artifact, o.batch, o.repeat)
    print(format_table(report), file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
