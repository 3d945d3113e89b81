"""This core's u8 x s8 dot-product peaks (AVX-512 VNNI vpdpbusd; AMX tdpbusd where the host has it), and the
latency they allow ResNet20.

    python -m benchmarks.vnni_peak [--artifact A] [--batch 1,128] [--reps 200]

`benchmarks/vnni_peak.c` (gcc -O2 -mavx512f -mavx512vnni, loaded with ctypes) runs 16 independent
vpdpbusd zmm accumulators per loop iteration (64 MACs each), one thread. Each rep is short (about a millisecond) and
the machine is shared, so the *best* rep is the peak (a rep that was not preempted); the median is also
reported. A chain of dependent 1-cycle adds gives the clock, hence vpdpbusd per cycle. The VNNI-limited
latency of a network is MACs x batch / peak: what a kernel doing nothing but vpdpbusd at full rate would
take (no loads, no requantization).

The last stdout line is JSON: gmacs (peak, GMAC/s), gops (= 2 x gmacs), ghz, macs_per_cycle,
macs_per_image and limit_ms per batch size; on AMX hosts also amx_gmacs (and its median) and amx_limit_ms.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.cli import check_fields, cli_main, each, int_list, option, parse_options, positive
from core.errors import DFQFError

SOURCE = Path(__file__).with_suffix(".c")
FLAGS = ["-O2", "-mavx512f", "-mavx512vnni", "-shared", "-fPIC"]


def has_vnni() -> bool:
    try:
        return "avx512_vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def build_library(cache: Path | None = None) -> ctypes.CDLL:
    """Compile vnni_peak.c once (cached by source hash) and load it."""
    if not has_vnni():
        raise DFQFError("this CPU has no AVX-512 VNNI (avx512_vnni not in /proc/cpuinfo)")
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise DFQFError("no C compiler (gcc) on PATH")
    from core.paths import cache_dir

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    lib = (cache or cache_dir() / "vnni_peak") / f"vnni_peak_{digest}.so"
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(".tmp.so")
        proc = subprocess.run([gcc, *FLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise DFQFError(f"gcc failed: {proc.stderr.strip()[:500]}")
        tmp.replace(lib)
    dll = ctypes.CDLL(str(lib))
    dll.vnni_loop.restype = ctypes.c_int64
    dll.vnni_loop.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_int32)]
    dll.add_chain.restype = ctypes.c_int64
    dll.add_chain.argtypes = [ctypes.c_int64]
    return dll


def _rates(fn, reps: int) -> np.ndarray:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        work = fn()
        out.append(work / (time.perf_counter() - t0))
    return np.asarray(out)


def measure_peak(reps: int = 200, iters: int = 250_000) -> dict[str, float]:
    """Peak and median u8 x s8 GMAC/s of one thread, the clock (GHz) and MACs per cycle."""
    dll = build_library()
    sink = ctypes.c_int32()
    dll.vnni_loop(iters // 10, ctypes.byref(sink))  # wake the core up
    macs = _rates(lambda: dll.vnni_loop(iters, ctypes.byref(sink)), reps)
    cycles = _rates(lambda: dll.add_chain(4 * iters), reps)  # returns cycles
    ghz = float(cycles.max()) / 1e9
    gmacs = float(macs.max()) / 1e9
    return {"gmacs": round(gmacs, 1), "gmacs_median": round(float(np.median(macs)) / 1e9, 1),
            "gops": round(2 * gmacs, 1), "ghz": round(ghz, 2), "macs_per_cycle": round(gmacs / ghz, 1),
            "vpdpbusd_zmm_per_cycle": round(gmacs / ghz / 64, 2),
            "reps": reps}


def _amx_loop():
    """A TIR kernel (built with TVM, so no C compiler): `iters` rounds of four `tdpbusd` on resident 16 x 64-byte
    tiles (2 A x 2 B -> 4 independent accumulators), the blocking of `lower.schedules.x86_amx`, then the
    accumulators stored to `out` [4, 16, 16] int32."""
    import tvm
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    from lower.schedules import x86_amx as X
    from lower.targets import make_target

    with IRBuilder() as ib:
        with T.prim_func(s_tir=False):
            T.func_name("amx_loop")
            iters = T.arg("iters", T.int64())
            a = T.arg("a", T.buffer((2, 16, 64), "uint8"))
            b = T.arg("b", T.buffer((2, 16, 64), "int8"))
            out = T.arg("out", T.buffer((4, 16, 16), "int32"))
            cfg = T.alloc_buffer((64,), "uint8", scope="local")
            for i, v in enumerate(X._config(16, 2, 2, 64)):
                T.buffer_store(cfg, tvm.tirx.const(v, "uint8"), [i])
            X._amx("ldtilecfg", T.address_of(cfg[0]))
            stride = tvm.tirx.const(64, "int64")
            for t in range(4):
                X._amx("tilezero", X._tile(t))
            for t in range(2):
                X._amx("tileloadd64", X._tile(4 + t), T.address_of(a[t, 0, 0]), stride)
                X._amx("tileloadd64", X._tile(6 + t), T.address_of(b[t, 0, 0]), stride)
            with T.serial(0, iters):
                for i in range(2):
                    for j in range(2):
                        X._amx("tdpbusd", X._tile(2 * i + j), X._tile(4 + i), X._tile(6 + j))
            for t in range(4):
                X._amx("tilestored64", X._tile(t), T.address_of(out[t, 0, 0]), stride)
            X._amx("tilerelease")
    module = tvm.compile(tvm.IRModule({"main": ib.get()}), target=make_target("llvm")).mod
    return module["main"]


def measure_amx_peak(reps: int = 200, iters: int = 20_000) -> dict[str, float] | None:
    """Peak and median AMX u8 x s8 GMAC/s of one thread (`_amx_loop`, 16 x 16 x 64 MACs per tdpbusd), or None
    where the host has no amx-int8 or Linux refuses the tile state."""
    import tvm

    from core.isa import amx_granted
    from lower.targets import host_features

    if "amx-int8" not in host_features() or not amx_granted():
        return None
    loop = _amx_loop()
    a, b = tvm.runtime.tensor(np.ones((2, 16, 64), np.uint8)), tvm.runtime.tensor(np.ones((2, 16, 64), np.int8))
    out = tvm.runtime.tensor(np.zeros((4, 16, 16), np.int32))
    loop(iters // 10, a, b, out)

    def run() -> int:
        loop(iters, a, b, out)
        return iters * 4 * 16 * 16 * 64

    macs = _rates(run, reps)
    if not (out.numpy() == 64 * iters).all():
        raise DFQFError("the AMX peak loop computed wrong sums")
    return {"amx_gmacs": round(float(macs.max()) / 1e9, 1), "amx_gmacs_median": round(float(np.median(macs)) / 1e9, 1)}


def resnet_macs(arch: str = "resnet20") -> int:
    """MACs per image of a registered architecture's Conv2d and Linear layers (forward hooks)."""
    import torch

    from train.models import build_model, get_arch

    model, total = build_model(arch).eval(), [0]

    def hook(m, inp, out):
        if isinstance(m, torch.nn.Conv2d):
            total[0] += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total[0] += m.in_features * m.out_features

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, *get_arch(arch).input_size))
    return total[0]


@dataclass(frozen=True)
class PeakOptions:
    artifact: Path | None = option(None, "take the MACs from this artifact's integer graph")
    arch: str = option("resnet20", "else from this registered architecture")
    batch: list[int] = option([1, 128], "batch sizes of the latency limit", parse=int_list, check=each(positive))
    reps: int = option(200, "timed repetitions (the best is the peak)", check=positive)

    def __post_init__(self) -> None:
        check_fields(self)


@cli_main
def main(argv: list[str] | None = None) -> int:
    o = parse_options(PeakOptions, argv, "python -m benchmarks.vnni_peak", __doc__.splitlines()[0])
    if o.artifact is not None:
        from lower.artifact import load_graph

        macs, source = load_graph(o.artifact).total_macs(), str(o.artifact)
    else:
        macs, source = resnet_macs(o.arch), o.arch
    peak = measure_peak(o.reps)
    limit = {str(b): round(macs * b / (peak["gmacs"] * 1e9) * 1e3, 4) for b in o.batch}
    print(f"vpdpbusd peak {peak['gmacs']} GMAC/s ({peak['gops']} GOP/s; median {peak['gmacs_median']}) at "
          f"~{peak['ghz']} GHz = {peak['macs_per_cycle']} MAC/cycle; {source}: {macs / 1e6:.2f} MMAC/image -> "
          + ", ".join(f"batch {b}: {ms} ms" for b, ms in limit.items()), file=sys.stderr)
    amx = measure_amx_peak(o.reps)
    if amx is not None:
        amx["amx_limit_ms"] = {str(b): round(macs * b / (amx["amx_gmacs"] * 1e9) * 1e3, 4) for b in o.batch}
        print(f"tdpbusd peak {amx['amx_gmacs']} GMAC/s (median {amx['amx_gmacs_median']}) -> "
              + ", ".join(f"batch {b}: {ms} ms" for b, ms in amx["amx_limit_ms"].items()), file=sys.stderr)
    print(json.dumps({**peak, **(amx or {}), "macs_per_image": macs, "macs_source": source, "limit_ms": limit}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
