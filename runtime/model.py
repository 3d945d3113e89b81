"""Load a compiled artifact (`lower.compile`) and run it: `load(artifact).predict(uint8 images)`.

    model = runtime.load("artifacts/w4a4/llvm")        # verifies every file against the manifest
    logits = model.predict(images)                      # uint8 [N, H, W, C] -> float32 [N, classes]
    codes = model.predict_int(images)                   # the int32 logits of the integer graph
    ort = runtime.load_onnx("artifacts/w4a4/llvm")      # the ONNX QDQ export under ONNX Runtime
    fast = runtime.load_onnx("artifacts/w4a4/llvm", variant="fast")  # on ORT's fused int8 kernels

Errors (bad artifact, missing device, wrong image shape or dtype) raise `core.errors.DFQFError`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from core.errors import DFQFError
from lower.artifact import GRAPH, LIBRARY, ONNX_FILES, PARAMS, load_graph, read_manifest
from lower.graph import IntGraph

DEVICE_OF_TARGET = {"llvm": "cpu", "cuda": "cuda"}


def _batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise DFQFError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


class IntegerModel:
    """The integer graph of an artifact, compiled by TVM, on one device."""

    def __init__(self, artifact: str | Path, device: str | None = None) -> None:
        from lower.params import pack_params

        from .executable import load_executable

        self.path = Path(artifact)
        self.manifest = read_manifest(self.path, required=(GRAPH, PARAMS, LIBRARY))
        self.graph = load_graph(self.path, verify=False)
        target = self.manifest.get("target", "llvm")
        self.device = device or DEVICE_OF_TARGET.get(target, "cpu")
        if DEVICE_OF_TARGET.get(target) != self.device:
            raise DFQFError(f"{self.path} was compiled for {target}; it runs on {DEVICE_OF_TARGET.get(target)}, "
                            f"not {self.device}")
        check_host_features(self.path, self.manifest)
        self.executable = load_executable(self.path / LIBRARY, self.device, self.manifest["files"][LIBRARY]["sha256"])
        self.executable.parallel_min_batch = parallel_min_batch(self.graph)
        self.params = self.executable.upload(pack_params(self.graph))
        self.scale = self.graph.output_scale.astype(np.float32)

    def predict_int(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """The int32 logits of uint8 [N, H, W, C] images, `batch_size` images per call."""
        batch_size = _batch_size(batch_size)
        x = self.graph.check_images(images)
        outs = [self.executable(x[i:i + batch_size], self.params) for i in range(0, len(x), batch_size)]
        return np.concatenate(outs) if outs else np.zeros((0, len(self.scale)), np.int32)

    def predict(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """Real logits, float32: the int32 output times its per-class scale (the only float op, after the graph)."""
        return (self.predict_int(images, batch_size) * self.scale).astype(np.float32)


def check_host_features(path: Path, manifest: dict[str, Any]) -> None:
    """The module's instruction set extensions (manifest "isa_features") are all on this host: never run a
    module that would stop the process with an illegal instruction."""
    from core.isa import request_amx
    from lower.targets import host_features

    needed = manifest.get("isa_features", [])
    if not isinstance(needed, list) or not all(isinstance(f, str) for f in needed):
        raise DFQFError(f"{path}: malformed isa_features in the manifest")
    missing = sorted(set(needed) - host_features())
    if missing:
        raise DFQFError(f"{path} was compiled for a CPU with {', '.join(missing)}, which this host lacks (it would "
                        "crash with an illegal instruction): compile it here, or with lower.compile --mcpu/--mattr "
                        "for this CPU")
    if manifest.get("schedules") == "x86_amx":
        request_amx()


def parallel_min_batch(graph: IntGraph) -> int:
    """The smallest batch whose average conv kernel call has `PARALLEL_MIN_MACS` (multi-threaded below that
    is slower: `runtime.executable.IntegerExecutable`)."""
    from .executable import PARALLEL_MIN_MACS

    macs = [m for name, m in graph.layer_macs().items() if graph.node(name).op == "conv2d"]
    return max(1, -(-PARALLEL_MIN_MACS // max(1, int(np.mean(macs))))) if macs else 1


class OnnxModel:
    """The artifact's ONNX QDQ export under ONNX Runtime (CPU): `variant` "exact" (model.onnx) or "fast"
    (model_fast.onnx, ORT's fused int8 kernels; see lower.onnx_export.VARIANTS)."""

    def __init__(self, artifact: str | Path, threads: int = 1, variant: str = "exact") -> None:
        from .ort import ort_session

        self.path = Path(artifact)
        if variant not in ONNX_FILES:
            raise DFQFError(f"unknown ONNX variant {variant!r}; known: {', '.join(ONNX_FILES)}")
        manifest = read_manifest(self.path)
        self.file = self.path / ONNX_FILES[variant]
        if ONNX_FILES[variant] not in manifest["files"]:
            raise DFQFError(f"{self.path} holds no {variant} ONNX export ({ONNX_FILES[variant]}); compile it again "
                            "without --no-onnx")
        self.graph = load_graph(self.path, verify=False)
        self.session = ort_session(self.file, threads=threads)

    def predict(self, images: Any) -> np.ndarray:
        return np.asarray(self.session(self.graph.check_images(images)), dtype=np.float32)


def load(artifact: str | Path, device: str | None = None) -> IntegerModel:
    return IntegerModel(artifact, device)


def load_onnx(artifact: str | Path, threads: int = 1, variant: str = "exact") -> OnnxModel:
    return OnnxModel(artifact, threads, variant)
