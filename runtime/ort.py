"""ONNX Runtime sessions for the artifact's QDQ export (`lower.onnx_export`): uint8 pixels in, float logits out."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from core.errors import DFQFError
from lower.onnx_export import INPUT, OUTPUT


def inference_session(path_or_model: str | Path | onnx.ModelProto, threads: int, spin: bool | None = None,
                      optimized_path: str | None = None):
    """An ONNX Runtime CPU InferenceSession with `threads` intra-op threads (one inter-op), all graph
    optimizations; spin: whether idle intra-op threads spin (None: ORT's default); optimized_path: also save
    the graph ORT runs there."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if spin is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if optimized_path is not None:  # QDQ fusions are "extended"; "all" adds CPU-specific layouts (NCHWc)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = optimized_path
    source = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def ort_session(path_or_model: str | Path | onnx.ModelProto, threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """An ONNX Runtime CPU session as a function: uint8 NHWC pixels -> float32 logits."""
    session = inference_session(path_or_model, threads)

    def run(pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.ndim != 4:
            raise DFQFError(f"expected uint8 NHWC images, got {pixels.dtype} {list(pixels.shape)}")
        return session.run([OUTPUT], {INPUT: pixels})[0]

    return run


def ort_optimized_ops(path_or_model: str | Path | onnx.ModelProto, workdir: str | Path) -> Counter:
    """Op types of the graph ONNX Runtime actually runs (after its QDQ fusions), e.g. QLinearConv counts."""
    out = Path(workdir) / "ort_optimized.onnx"
    inference_session(path_or_model, 1, optimized_path=str(out))
    return Counter(node.op_type for node in onnx.load(str(out)).graph.node)
