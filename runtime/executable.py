"""A compiled integer module loaded with TVM's Relax VM, and the CPU thread policy it runs under.

`load_executable(path)` loads a `model.so` of `lower.compile`; `IntegerExecutable(pixels, params)` runs it.
Parameters go through `upload` once (device tensors, and the parameter-only work that relax
LiftTransformParams moved into `main_transform_params`: weight packing, per-channel constants).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tvm
from tvm import relax

from core.errors import DFQFError, first_line
from core.isa import amx_granted
from lower.targets import TARGETS, host_features, target_spec


class PreparedParams(list):
    """`IntegerExecutable.upload`'s result: device tensors in the compiled main's own parameter layout."""


TRANSFORM_PARAMS = "main_transform_params"  # made by relax LiftTransformParams from main's parameter-only work


# Below this many MACs per conv kernel call, a batch runs on one CPU thread: every kernel is a fork-join of
# TVM's thread pool, and waking the other threads (~15 us per kernel when idle threads do not spin) costs
# more than they save. Measured 2026-11-24 on the 2-core host, ResNet20 W8A8 (2.1 MMAC per conv and image),
# 1 vs 2 threads: batch 1 0.29 vs 0.96 ms, batch 8 2.1 vs 2.3 ms, batch 16 4.2 vs 3.4 ms, batch 32 8.3 vs 5.7 ms.
PARALLEL_MIN_MACS = 24_000_000


def cpu_threads(n: int | None = None) -> int:
    """The size of TVM's CPU thread pool; with `n`, resize it first (cheap: ~30 us, threads are kept)."""
    if n is not None and n != tvm.runtime.module.num_threads():
        tvm.get_global_func("runtime.config_threadpool")(1, n)  # 1: the pool's default (big-core) mode
    return tvm.runtime.module.num_threads()


class IntegerExecutable:
    """A loaded module: `self(pixels, params)` -> int32 numpy logits; params in `param_order` (or `upload`ed).

    On the CPU a call uses all of TVM's threads (TVM_NUM_THREADS) only when its kernels are large enough:
    `parallel_min_batch` (set from the graph by `runtime.model`, `PARALLEL_MIN_MACS`); smaller batches run on
    one thread."""

    def __init__(self, module: tvm.runtime.Module, device: tvm.runtime.Device) -> None:
        if "amx-tile" in host_features():
            amx_granted()  # before any AMX kernel runs (`core.isa`); `runtime.model` fails clearly if refused
        self.device = device
        self.vm = relax.VirtualMachine(module, device)
        self.main = self.vm["main"]
        self.input: tvm.runtime.Tensor | None = None  # reused while the image batch shape stays the same
        self.input_view: np.ndarray | None = None
        self.on_cpu = device.dlpack_device_type() == tvm.cpu().dlpack_device_type()
        self.max_threads = cpu_threads() if self.on_cpu else 1
        self.parallel_min_batch = 1
        try:
            self.transform_params = self.vm[TRANSFORM_PARAMS] is not None
        except (AttributeError, KeyError, RuntimeError, ValueError, tvm.error.InternalError):
            self.transform_params = False

    def upload(self, params: Sequence[Any]) -> PreparedParams:
        """Parameters (in `param_order`) as device tensors in main's layout: do it once, then pass the result
        to every call. Weight packing and per-channel constants run here, once, not in every call."""
        if isinstance(params, PreparedParams):
            return params
        tensors = [p if isinstance(p, tvm.runtime.Tensor) else tvm.runtime.tensor(np.ascontiguousarray(p), self.device)
                   for p in params]
        try:
            if self.transform_params:
                tensors = list(self.vm[TRANSFORM_PARAMS](tensors))
        except Exception as e:  # noqa: BLE001 - TVM reports shape/dtype mismatches as several exception types
            raise DFQFError(f"the compiled module does not take these parameters ({first_line(e)}); "
                            "model.so and params.npz/graph.json come from different compiles?") from None
        return PreparedParams(tensors)

    def __call__(self, pixels: np.ndarray, params: Sequence[Any]) -> np.ndarray:
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.ndim != 4:
            raise DFQFError(f"expected uint8 NHWC images, got {pixels.dtype} {list(pixels.shape)}")
        if self.input is None or tuple(self.input.shape) != pixels.shape:
            self.input = tvm.runtime.empty(pixels.shape, "uint8", self.device)
            # on the CPU, a numpy view of the tensor: filling it is a plain memcpy (copyfrom costs ~10 us)
            self.input_view = np.from_dlpack(self.input) if self.on_cpu else None
        if self.input_view is not None:
            self.input_view[...] = pixels
        else:
            self.input.copyfrom(np.ascontiguousarray(pixels))
        if self.max_threads > 1:
            cpu_threads(self.max_threads if len(pixels) >= self.parallel_min_batch else 1)
        params = self.upload(params)
        try:
            out = self.main(self.input, *params)
        except Exception as e:  # noqa: BLE001
            raise DFQFError(f"the compiled module failed on {list(pixels.shape)} images ({first_line(e)}); "
                            "model.so and graph.json come from different compiles?") from None
        # on the CPU the logits are handed over without a copy (the returned array keeps them alive)
        return np.from_dlpack(out) if self.on_cpu else out.numpy()


def _device(device: str | tvm.runtime.Device) -> tvm.runtime.Device:
    if isinstance(device, str):
        kind = target_spec(device).device if device in TARGETS else device
        return tvm.runtime.device(kind, 0)
    return device


# Loaded libraries by (path, sha256). TVM's load_module keeps about 80 kB per call that is never freed (a
# dlopen'ed library is not unloaded; measured: RSS +85 kB per load/unload cycle), so loading the same file
# again reuses its module: each IntegerExecutable still gets its own VirtualMachine (which frees cleanly).
_MODULES: dict[tuple[str, str], tvm.runtime.Module] = {}


def load_executable(path: str | os.PathLike, device: str | tvm.runtime.Device = "cpu",
                    sha256: str | None = None) -> IntegerExecutable:
    """Load an exported library on `device` ('cpu', 'cuda', a target name, or a tvm Device); with the file's
    `sha256` (from a verified manifest) a library loaded before is reused."""
    if not Path(path).is_file():
        raise DFQFError(f"compiled library not found: {path}")
    dev = _device(device)
    if not dev.exist:
        raise DFQFError(f"device {dev} is not available on this machine")
    key = (str(Path(path).resolve()), sha256 or "")
    try:
        module = _MODULES.get(key) if sha256 else None
        if module is None:
            module = tvm.runtime.load_module(str(path))
            if sha256:
                _MODULES[key] = module
        return IntegerExecutable(module, dev)
    except Exception as e:  # noqa: BLE001 - not a shared library, or not a Relax VM executable
        raise DFQFError(f"cannot load the compiled library {path}: {first_line(e)}") from None


def run_executable(executable: relax.VMExecutable, pixels: np.ndarray, params: Sequence[Any],
                   device: str | tvm.runtime.Device = "cpu") -> np.ndarray:
    """Run a freshly compiled (not exported) executable once; convenient in tests."""
    return IntegerExecutable(executable.mod, _device(device))(pixels, params)


