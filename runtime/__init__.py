"""Run compiled DFQF artifacts: `runtime.load(artifact).predict(uint8 images)` (see runtime.model)."""
from .model import IntegerModel, OnnxModel, load, load_onnx

__all__ = ["IntegerModel", "OnnxModel", "load", "load_onnx"]
