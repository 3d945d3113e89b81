"""The integer graph: what `lower.integerize` produces and every backend (NumPy reference, TVM, ONNX) consumes.

A graph is a list of nodes in topological order. Every node computes one integer tensor, named after the
node. Batch is the leading axis of every tensor and is not part of the recorded shapes. The exact
semantics of each op are defined by `lower.reference` (NumPy, int64); the backends must match it bit for
bit. Ops (`OPS`):

- quantize_input   x: uint8 [N,H,W,C] raw pixels -> [N,C,H,W]; out[n,c,h,w] = lut[c, x[n,h,w,c]]
                   (the lookup table holds quantize(normalize(pixel)), so normalization is folded in).
- conv2d           x [N,Cin,H,W]; weight int [O,Cin/groups,kh,kw], bias int32 [O] (zero when a requantize
                   adds the bias; the logits layer's bias);
                   acc = sum((x - input_zero_point) * weight) + bias, padding contributes 0
                   (the padded input is input_zero_point, i.e. real 0). int32 out.
- dense            x [N,K]; weight [O,K], bias [O]; same as conv2d. int32 out.
- requantize       terms t_0..t_{k-1} (same shape); multiplier int64 [k,C], shift int64 [C], offset int64 [C],
                   C along axis 1 (C = 1: per tensor); y = clamp(output_zero_point
                   + ((sum_i (t_i - zp_i) * multiplier[i,c] + offset[c] + 2^(shift[c]-1)) >> shift[c]),
                   qmin, qmax). One rounding (half up) for the whole sum: residual adds, ReLU (qmin = zero
                   point), the scale change of a conv output and the conv's bias (offset: bias / s_y * 2^shift,
                   finer than an int32 bias at the accumulator scale) are all this op.
- sum_pool2d       window sums (int32) with kernel/stride, no padding; global pooling = kernel of H,W.
- max_pool2d       window max with kernel/stride/padding (padding never wins: it is the dtype's minimum).
- clamp            clamp(x, qmin, qmax).
- strided_slice    x[begin:end:step] per axis (batch axis included, as slices over all axes).
- pad              constant pad with `value` (the zero point: real 0); pads = [[before, after]] per axis.
- reshape          to [N, *shape] (shape may contain one -1).

Weights are stored unpacked (int8 arrays holding `weight_bits`-bit values); `lower.int4` packs them two per
byte in artifacts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from core.errors import DFQFError

STORAGE_DTYPES = ("uint8", "int8", "int32")
# op -> (number of inputs or None for "one or more", required attrs, required params)
OPS: dict[str, tuple[int | None, tuple[str, ...], tuple[str, ...]]] = {
    "quantize_input": (1, (), ("lut",)),
    "conv2d": (1, ("stride", "padding", "dilation", "groups", "input_zero_point", "weight_bits"), ("weight", "bias")),
    "dense": (1, ("input_zero_point", "weight_bits"), ("weight", "bias")),
    "requantize": (None, ("input_zero_points", "output_zero_point", "qmin", "qmax"), ("multiplier", "shift", "offset")),
    "sum_pool2d": (1, ("kernel", "stride"), ()),
    "max_pool2d": (1, ("kernel", "stride", "padding"), ()),
    "clamp": (1, ("qmin", "qmax"), ()),
    "strided_slice": (1, ("begin", "end", "step"), ()),
    "pad": (1, ("pads", "value"), ()),
    "reshape": (1, ("shape",), ()),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _ints(n: int | None = None) -> Callable[[Any], bool]:
    """A list of integers (of length n)."""
    return lambda v: isinstance(v, (list, tuple)) and (n is None or len(v) == n) and all(_is_int(x) for x in v)


def _optional_ints(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(x is None or _is_int(x) for x in v)


# attribute -> its type check (the attributes `OPS` requires)
ATTR_TYPES: dict[str, Callable[[Any], bool]] = {
    **{a: _is_int for a in ("groups", "input_zero_point", "weight_bits", "output_zero_point", "qmin", "qmax",
                            "value")},
    **{a: _ints(2) for a in ("stride", "padding", "dilation", "kernel")},
    "input_zero_points": _ints(), "shape": _ints(),
    "begin": _optional_ints, "end": _optional_ints, "step": _optional_ints,
    "pads": lambda v: isinstance(v, (list, tuple)) and all(_ints(2)(p) for p in v),
}


@dataclass(frozen=True)
class TensorInfo:
    """An integer tensor and the reals it stands for: real = scale * (q - zero_point).

    shape excludes the batch axis. scale is per tensor (one value) or per channel (axis 1 of the batched
    tensor); accumulators carry scale s_x * s_w per output channel. bits/signed give the value range
    (32 for accumulators), dtype the storage.
    """

    shape: tuple[int, ...]
    dtype: str
    bits: int
    signed: bool
    scale: tuple[float, ...]
    zero_point: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise DFQFError(f"storage dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        ok = (isinstance(self.shape, tuple) and all(_is_int(d) and d > 0 for d in self.shape)
              and _is_int(self.bits) and 1 <= self.bits <= 32 and isinstance(self.signed, (bool, np.bool_))
              and isinstance(self.scale, tuple) and len(self.scale) > 0
              and all(isinstance(v, (float, int, np.floating)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                      for v in self.scale) and _is_int(self.zero_point))
        if not ok:
            raise DFQFError(f"malformed tensor info (shape {self.shape!r}, bits {self.bits!r}, signed {self.signed!r}, "
                            f"scale {str(self.scale)[:60]}, zero point {self.zero_point!r})")

    @property
    def qrange(self) -> tuple[int, int]:
        if self.signed:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "bits": self.bits, "signed": self.signed,
                "scale": list(self.scale), "zero_point": self.zero_point}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorInfo":
        return cls(tuple(d["shape"]), d["dtype"], d["bits"], d["signed"], tuple(d["scale"]), d["zero_point"])


@dataclass
class Node:
    op: str
    name: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class IntGraph:
    """input: uint8 NHWC pixels of `input_shape` (H, W, C); output: the last node's int32 logits."""

    input_name: str
    input_shape: tuple[int, int, int]
    nodes: list[Node]
    tensors: dict[str, TensorInfo]
    output: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not (isinstance(self.input_name, str) and _ints(3)(self.input_shape) and min(self.input_shape) > 0
                and isinstance(self.output, str) and isinstance(self.meta, dict)):
            raise DFQFError(f"malformed integer graph (input {self.input_name!r} {self.input_shape!r}, "
                            f"output {self.output!r})")
        seen = {self.input_name}
        for n in self.nodes:
            if not (isinstance(n.attrs, dict) and isinstance(n.params, dict) and all(isinstance(i, str) for i in n.inputs)):
                raise DFQFError(f"node {n.name!r} is malformed (attrs, params and inputs)")
            if n.op not in OPS:
                raise DFQFError(f"unknown integer op {n.op!r} in node {n.name}; known: {', '.join(OPS)}")
            arity, attrs, params = OPS[n.op]
            if (arity is not None and len(n.inputs) != arity) or not n.inputs:
                raise DFQFError(f"node {n.name} ({n.op}) has {len(n.inputs)} inputs")
            missing = [a for a in attrs if a not in n.attrs] + [p for p in params if p not in n.params]
            if missing:
                raise DFQFError(f"node {n.name} ({n.op}) lacks {', '.join(missing)}")
            wrong = [a for a in attrs if not ATTR_TYPES[a](n.attrs[a])]
            if wrong:
                raise DFQFError(f"node {n.name} ({n.op}): malformed {', '.join(f'{a}={n.attrs[a]!r}' for a in wrong)}")
            bad = [p for p in params if not (isinstance(n.params[p], np.ndarray) and n.params[p].dtype.kind in "iu")]
            if bad:
                raise DFQFError(f"node {n.name} ({n.op}): parameters {', '.join(bad)} are not integer arrays")
            if n.op == "requantize" and len(n.attrs["input_zero_points"]) != len(n.inputs):
                raise DFQFError(f"node {n.name}: {len(n.inputs)} terms but {len(n.attrs['input_zero_points'])} zero points")
            undefined = [i for i in n.inputs if i not in seen]
            if undefined:
                raise DFQFError(f"node {n.name} reads {', '.join(undefined)} before it is computed")
            if not isinstance(n.name, str) or n.name in seen or n.name not in self.tensors:
                raise DFQFError(f"node {n.name} is defined twice or has no tensor info")
            seen.add(n.name)
        if self.output not in seen:
            raise DFQFError(f"graph output {self.output} is not computed")

    @property
    def output_scale(self) -> np.ndarray:
        """Real logits = output_scale * int32 output (per class)."""
        return np.asarray(self.tensors[self.output].scale, dtype=np.float64)

    def layer_macs(self) -> dict[str, int]:
        """Multiply-accumulates per image of every conv2d and dense node: output elements times the
        weight's fan-in (Cin/groups x kh x kw for a conv, K for a dense)."""
        return {n.name: int(np.prod(self.tensors[n.name].shape)) * int(np.prod(np.shape(n.params["weight"])[1:]))
                for n in self.nodes if n.op in ("conv2d", "dense")}

    def total_macs(self) -> int:
        """Multiply-accumulates per image of all conv2d and dense nodes (ResNet20 CIFAR: 40.55 M)."""
        return sum(self.layer_macs().values())

    def check_images(self, images: Any) -> np.ndarray:
        """uint8 [N, H, W, C] pixels of this graph's input shape, as a contiguous array."""
        x = np.asarray(images)
        if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.input_shape):
            raise DFQFError(f"expected uint8 images of shape [N, {', '.join(map(str, self.input_shape))}] (NHWC), "
                            f"got {x.dtype} {list(x.shape)}")
        return np.ascontiguousarray(x)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    # -- serialization: structure as JSON, integer parameters as a dict of arrays -----------------------
    def structure(self) -> dict[str, Any]:
        return {"input_name": self.input_name, "input_shape": list(self.input_shape), "output": self.output,
                "meta": self.meta, "tensors": {k: v.to_dict() for k, v in self.tensors.items()},
                "nodes": [{"op": n.op, "name": n.name, "inputs": list(n.inputs), "attrs": n.attrs,
                           "params": sorted(n.params)} for n in self.nodes]}

    def param_arrays(self) -> dict[str, np.ndarray]:
        return {f"{n.name}/{k}": v for n in self.nodes for k, v in n.params.items()}

    @classmethod
    def from_parts(cls, structure: dict[str, Any], arrays: dict[str, np.ndarray]) -> "IntGraph":
        try:
            nodes = [Node(d["op"], d["name"], tuple(d["inputs"]), d["attrs"],
                          {k: np.asarray(arrays[f"{d['name']}/{k}"]) for k in d["params"]})
                     for d in structure["nodes"]]
            tensors = {k: TensorInfo.from_dict(v) for k, v in structure["tensors"].items()}
            return cls(structure["input_name"], tuple(structure["input_shape"]), nodes, tensors,
                       structure["output"], structure.get("meta", {}))
        except KeyError as e:
            raise DFQFError(f"integer graph is missing {e}") from None
