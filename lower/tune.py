"""`lower.compile --tune SECONDS`: an empirical search, on this machine, of the register tile of every distinct
hand-scheduled conv kernel (`lower.schedules.x86_conv`), cached in the artifact as `tuning.json`.

Why not meta_schedule. The issue asked for optional meta_schedule tuning with its database in the artifact.
meta_schedule cannot tensorize our VNNI dot intrinsic, and every hand-written conv kernel is marked
`tirx.is_scheduled` (meta_schedule skips it), so meta_schedule would only touch the small elementwise kernels.
The knob that matters for the convs is our own register tile (output columns x channel blocks,
`x86_conv.register_tile`): it decides how many accumulators stay in registers and how many broadcasts and
weight loads each reduction step needs. So this module times a few tiles per kernel and
keeps the fastest. Correctness never depends on it: the tile only reorders the loops of an exact integer
computation, so every tile gives the same integers; without a tuning file every kernel gets its default tile.

Kernels are keyed by `x86_conv.kernel_key` (family, input size, padding, channels, input dtype, kernel, stride,
dilation, epilogue), so a tuning.json from one artifact applies to any graph with the same kernels (`--tuning FILE`).
The result (JSON, `VERSION`):
    {"version": 2, "target": ..., "batch": 8, "budget_s": ..., "seconds": ..., "rounds": ...,
     "kernels": {key: {"tile": [zt, obt], "default": [zt, obt], "status": "tuned" | "from file" | "default",
                       "ms": {"zt,obt": ms, ...}, "nodes": [...]}}}
"default" means not measured: no --tune, or the time budget ran out first (kernels are tuned in order of
their MACs, biggest first). "rounds": complete passes over every candidate of every kernel (a few, while the
budget lasts; each tile keeps its fastest time).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tvm

from core.errors import DFQFError

from .graph import IntGraph
from .schedules import ScheduleSet
from .schedules.x86_conv import KernelRequest, check_tile, register_tile, tiles_by_preference

VERSION = 2  # 2: kernel keys name the unpadded input, its padding and dtype (the kernels pad their input)
BATCH = 8  # the batch the kernels are timed at
MAX_CANDIDATES = 6
MAX_ROUNDS = 5  # passes over all candidates while the budget lasts
KEEP_DEFAULT_WITHIN = 1.02  # a tile must beat the default by more than 2% (timing noise) to replace it


def kernel_requests(g: IntGraph, schedules: ScheduleSet | None) -> dict[str, KernelRequest]:
    """Kernel key -> request of every hand-scheduled kernel of `g` with a tunable register tile under schedule set
    `schedules` (builds the Relax module once, compiles nothing); empty when `schedules` is None."""
    from .tvm_build import build_relax

    kernels: dict[str, KernelRequest] = {}
    if schedules is not None:
        build_relax(g, schedules, kernels=kernels)
    return {key: r for key, r in kernels.items() if r.family.tunable}


def default_tile(r: KernelRequest) -> tuple[int, int]:
    return register_tile(*r.tile_extents, r.family.max_acc)


def candidates(r: KernelRequest, cap: int = MAX_CANDIDATES) -> list[tuple[int, int]]:
    """Register tiles worth timing, best first (`x86_conv.tiles_by_preference`, so the default comes first):
    those with at least 2 accumulators, and the default even where it holds one (OW = out_blocks = 1);
    at most `cap`."""
    ranked = tiles_by_preference(*r.tile_extents, r.family.max_acc)
    return [t for i, t in enumerate(ranked) if i == 0 or t[0] * t[1] >= 2][:cap]


def macs(r: KernelRequest) -> int:
    """Multiply-accumulates of one image through the kernel, times the nodes that use it."""
    oh, ow = r.output_hw
    sh = r.shape
    return oh * ow * sh.out_blocks * r.family.lanes * sh.cin * sh.kernel[0] * sh.kernel[1] * len(r.nodes)


def _random_args(func: tvm.tirx.PrimFunc, batch: int, device: tvm.runtime.Device) -> list[tvm.runtime.Tensor]:
    """Inputs of the kernel's dtypes and shapes (the batch variable set to `batch`) and a zero output.
    Shifts are 16 and the rest small random integers: the timing does not depend on the values."""
    rng = np.random.default_rng(0)
    out = []
    for i, buf in enumerate(func.params):
        shape = [batch if isinstance(d, tvm.tirx.Var) else int(d) for d in buf.shape]
        dtype = str(buf.dtype)
        if i == len(func.params) - 1:
            a = np.zeros(shape, dtype)
        elif buf.name == "shift":
            a = np.full(shape, 16, dtype)
        else:
            lo, hi = (0, 256) if dtype == "uint8" else (-128, 128)
            a = rng.integers(lo, hi, shape).astype(dtype)
        out.append(tvm.runtime.tensor(a, device))
    return out


def timer(r: KernelRequest, tile: tuple[int, int], target: tvm.target.Target, batch: int = BATCH,
          repeat: int = 5) -> Callable[[], float]:
    """Compile the kernel with register tile `tile`; the result times one call at `batch`, in milliseconds
    (min over `repeat` runs of at least 10 ms each)."""
    func = r.family.kernel(tvm.tirx.Var("n", "int64"), r.shape, epilogue=r.epilogue, tile=tile)
    module = tvm.compile(tvm.IRModule({"main": func}), target=target).mod
    device = tvm.cpu()
    evaluate = module.time_evaluator("main", device, number=1, repeat=repeat, min_repeat_ms=10)
    args = _random_args(func, batch, device)
    return lambda: 1e3 * min(evaluate(*args).results)


def _entry(r: KernelRequest, tile, status: str, ms: dict[str, float]) -> dict[str, Any]:
    return {"tile": list(tile), "default": list(default_tile(r)), "status": status, "ms": ms, "nodes": list(r.nodes)}


def _label(tile: tuple[int, int]) -> str:
    return f"{tile[0]},{tile[1]}"


def tune(requests: dict[str, KernelRequest], target: tvm.target.Target, seconds: float = 0.0,
         known: dict[str, dict] | None = None, batch: int = BATCH, rounds: int = MAX_ROUNDS,
         log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Tile per kernel: `known` entries (from an earlier tuning.json, keys of `requests` only) as they are,
    the rest timed within `seconds`, biggest kernels first, the default tile where the budget ran out. Time
    left after one pass over every candidate goes to further passes (up to `rounds` in all), each keeping the
    minimum per tile: on a loaded machine the minimum is the steadiest estimate."""
    known = known or {}
    start = time.perf_counter()
    deadline = start + seconds
    pending = sorted((key for key in requests if key not in known), key=lambda k: -macs(requests[k]))
    ms: dict[str, dict[str, float]] = {key: {} for key in pending}
    timers: dict[tuple[str, tuple[int, int]], Callable[[], float]] = {}
    done = 0
    for _ in range(rounds):
        for key in pending:
            for tile in candidates(requests[key]):
                if time.perf_counter() >= deadline:
                    break
                if (key, tile) not in timers:
                    timers[key, tile] = timer(requests[key], tile, target, batch)
                t = round(timers[key, tile](), 4)
                ms[key][_label(tile)] = min(t, ms[key].get(_label(tile), t))
        if time.perf_counter() >= deadline:
            break
        done += 1
    kernels = {key: {**entry, "status": "from file", "nodes": list(requests[key].nodes)}
               for key, entry in known.items()}
    for key in pending:
        r, times = requests[key], ms[key]
        if not times:
            kernels[key] = _entry(r, default_tile(r), "default", times)
            continue
        default = _label(default_tile(r))
        best = min(times, key=times.get)
        if times[best] * KEEP_DEFAULT_WITHIN >= times[default]:
            best = default
        kernels[key] = _entry(r, tuple(int(t) for t in best.split(",")), "tuned", times)
        log(f"tune {', '.join(r.nodes)}: tile {best} ({times[best]:.3f} ms), default {default} "
            f"({times[default]:.3f} ms)")
    return {"version": VERSION, "target": str(target), "batch": batch, "budget_s": seconds,
            "seconds": round(time.perf_counter() - start, 2), "rounds": done, "kernels": kernels}


def load_tuning(path: Path) -> dict[str, Any]:
    """A tuning.json (this module's format); DFQFError if it is missing, not JSON or another version."""
    path = Path(path)
    if not path.is_file():
        raise DFQFError(f"tuning file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DFQFError(f"tuning file {path} is not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("kernels"), dict):
        version = data.get("version") if isinstance(data, dict) else None
        raise DFQFError(f"tuning file {path} is not a version-{VERSION} tuning.json (version {version!r})")
    return data


def matching(tuning: dict[str, Any], requests: dict[str, KernelRequest]) -> dict[str, dict]:
    """The entries of `tuning` whose key is one of `requests`, their tiles checked against the kernel."""
    out = {}
    for key, entry in tuning["kernels"].items():
        if key in requests:
            r = requests[key]
            try:
                tile = check_tile(r.family, *r.tile_extents, tuple(entry["tile"]))
            except (KeyError, TypeError, ValueError):
                raise DFQFError(f"tuning entry {key} has no valid tile") from None
            out[key] = {**entry, "tile": list(tile)}
    return out


def tiles(result: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Kernel key -> tile, for `lower.tvm_build.build_relax(tiles=...)`."""
    return {key: tuple(entry["tile"]) for key, entry in result["kernels"].items()}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The manifest's short record of a tuning result."""
    status = [e["status"] for e in result["kernels"].values()]
    return {"kernels": len(status), "tuned": status.count("tuned"), "from_file": status.count("from file"),
            "default": status.count("default"), "budget_s": result["budget_s"], "seconds": result["seconds"],
            "rounds": result.get("rounds", 0), "batch": result["batch"]}
