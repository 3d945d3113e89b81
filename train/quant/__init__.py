"""Quantization core shared by train/ and lower/: QuantSpec, pure math, fake-quant modules."""
from .spec import QuantSpec, activation_spec, input_spec, weight_spec

__all__ = ["QuantSpec", "activation_spec", "input_spec", "weight_spec"]
