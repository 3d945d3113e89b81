"""ONNX Runtime sessions for the artifact's QDQ export (`lower.onnx_export`): uint8 pixels in, float logits out."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from core.errors import DFQFError
from lower.graph import IntGraph
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


def code_outputs(model: onnx.ModelProto, graph: IntGraph) -> dict[str, tuple[str, int]]:
    """Integer-graph tensor -> (the ONNX tensor that holds its codes, what was added to them): the
    QuantizeLinear or Clip output the exporter names `<tensor>/q`, `<tensor>/clip`; int8 values stored as
    uint8 + 128 (ORT's fast path takes u8 activations). int32 tensors are floats in the export: none."""
    produced = {o for node in model.graph.node for o in node.output}
    zero_types = {i.name: i.data_type for i in model.graph.initializer}
    quantizers = {n.output[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    found = {}
    for name, info in graph.tensors.items():
        q = quantizers.get(f"{name}/q")
        if info.dtype == "int32" or q is None:
            continue
        stored_u8 = zero_types.get(q.input[2]) == onnx.TensorProto.UINT8
        offset = 128 if info.dtype == "int8" and stored_u8 else 0
        found[name] = (f"{name}/clip" if f"{name}/clip" in produced else f"{name}/q", offset)
    return found


class OrtCodes:
    """The export at `path` with every activation's codes as extra outputs: `(pixels) -> (float32 logits,
    {tensor: int64 codes in the integer graph's convention})` — what ORT computes at each layer, to compare
    code by code with the integer graph; `tensors`: the integer-graph tensors it reports."""

    def __init__(self, path: str | Path, graph: IntGraph, threads: int = 1) -> None:
        model = onnx.load(str(path))
        self.outputs = code_outputs(model, graph)
        self.tensors = list(self.outputs)
        self.names = [OUTPUT]
        for tensor, _ in self.outputs.values():  # as int32: numpy has no 4-bit types
            self.names.append(f"{tensor}/codes")
            cast = onnx.helper.make_node("Cast", [tensor], [self.names[-1]], to=onnx.TensorProto.INT32)
            model.graph.node.append(cast)
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(self.names[-1]))
        self.session = inference_session(model, threads)

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        logits, *codes = self.session.run(self.names, {INPUT: np.ascontiguousarray(pixels)})
        return logits, {t: np.asarray(c).astype(np.int64) - offset
                        for (t, (_, offset)), c in zip(self.outputs.items(), codes)}
