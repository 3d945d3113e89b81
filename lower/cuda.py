"""CUDA builds without a GPU: the generated CUDA source of a `cuda` executable and offline PTX checks with nvcc."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import tvm
from tvm import relax

from core.errors import DFQFError


def _device_modules(module: tvm.runtime.Module, kind: str) -> list[tvm.runtime.Module]:
    found = [module] if module.kind == kind else []
    for m in module.imports:
        found += _device_modules(m, kind)
    return found


def cuda_source(executable: relax.VMExecutable) -> str:
    """The generated CUDA C++ of a cuda build (kept in the module; no GPU needed)."""
    mods = _device_modules(executable.mod, "cuda")
    if not mods:
        raise DFQFError("the executable holds no CUDA module (was it compiled for target 'cuda'?)")
    return "\n".join(m.inspect_source("cuda") or m.inspect_source() for m in mods)


def find_nvcc() -> str | None:
    """nvcc on PATH, else under $CUDA_HOME or /usr/local/cuda."""
    found = shutil.which("nvcc")
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if not found and root and Path(root, "bin", "nvcc").is_file():
            found = str(Path(root, "bin", "nvcc"))
    return found


def compile_cuda_ptx(source: str, arch: str = "sm_80", nvcc: str | None = None) -> str:
    """Compile CUDA source to PTX for `arch` with nvcc (offline: no GPU needed); returns the PTX text."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise DFQFError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        src, ptx = Path(tmp, "kernels.cu"), Path(tmp, "kernels.ptx")
        src.write_text(source)
        proc = subprocess.run([nvcc, "--ptx", "-O3", f"-arch={arch.replace('sm_', 'compute_')}", "-o", str(ptx),
                               str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise DFQFError(f"nvcc failed for {arch}: {proc.stderr.strip()[:2000]}")
        return ptx.read_text()
