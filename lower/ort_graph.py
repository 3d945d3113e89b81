"""The integer graph restructured as ONNX Runtime's fused int8 kernels compute it (`lower.compile --for-ort`).

ORT's fast path (QLinearConv, QLinearAdd) differs from the default integer graph in two places:
- a conv's bias is an int32 at the accumulator scale, where `requantize` adds it finer (`offset`, a fraction
  of an output step): here every conv/dense bias is folded into its int32 bias (rounded half up, off by at
  most half an accumulator step) and the offset is 0;
- a residual block's conv output is rounded to int8 on its own before the add (QLinearConv, then
  QLinearAdd), where `requantize` rounds the whole sum once: here every int32 conv/dense term of a sum
  becomes its own requantize to an int8 tensor `<conv>_term` at scale (qmax - qmin) * s_y / 127 (the output's
  whole range on either side of zero: a term is clipped only where the sum saturates anyway), and the sum
  adds the int8 terms.
The result is an ordinary integer graph (same ops): the NumPy reference defines it, TVM runs it, and ORT's
fused kernels compute it up to float32 rounding in their requantizers (half to even instead of half up at
exact ties). It rounds twice in residual blocks, so it is a little further from the fake-quant student than
the default graph; `runtime.parity` measures both distances.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np

from core.errors import DFQFError
from train.quant import primitives as P

from .graph import IntGraph, Node, TensorInfo

INT32_MAX = 2**31 - 1


def accumulator_bound(n: Node) -> int:
    """max |acc| of a conv2d/dense over any input: sum |w| * max |x - zp| per output channel, plus |bias|."""
    w = np.abs(np.asarray(n.params["weight"], np.int64)).reshape(len(n.params["weight"]), -1).sum(1)
    x_max = 255 + abs(int(n.attrs["input_zero_point"]))
    return int((w * x_max + np.abs(np.asarray(n.params["bias"], np.int64))).max())


def for_ort(graph: IntGraph) -> IntGraph:
    """`graph` restructured for ORT's fused kernels (see the module docstring); `graph` is not changed."""
    readers = Counter(i for n in graph.nodes for i in n.inputs)
    nodes: list[Node] = []
    tensors = dict(graph.tensors)
    convs = {n.name: replace(n, params=dict(n.params)) for n in graph.nodes if n.op in ("conv2d", "dense")}
    for n in graph.nodes:
        if n.name in convs:
            nodes.append(convs[n.name])
            continue
        if n.op != "requantize":
            nodes.append(n)
            continue
        acc = [t for t in n.inputs if t in convs and readers[t] == 1]
        if len(n.inputs) == 1 and acc:
            nodes.append(_fold_offset(n, convs[acc[0]], graph))
            continue
        if not acc:
            nodes.append(n)
            continue
        terms = list(n.inputs)
        for i, t in enumerate(n.inputs):
            if t in acc:
                term, info = _term(n, i, convs[t], graph, fold=i == n.inputs.index(acc[0]))
                nodes.append(term)
                tensors[term.name] = info
                terms[i] = term.name
        nodes.append(_sum_of_terms(n, terms, tensors, graph))
    return IntGraph(graph.input_name, graph.input_shape, nodes, tensors, graph.output,
                    {**graph.meta, "structure": "ort"})


def _fold_offset(n: Node, conv: Node, graph: IntGraph) -> Node:
    """requantize([acc]) with its offset moved into the conv's int32 bias: offset[c] / multiplier[0, c]
    accumulator steps."""
    offset = np.asarray(n.params["offset"], np.int64)
    if not offset.any():
        return n
    m = np.asarray(n.params["multiplier"], np.float64)[0]
    _add_bias(conv, offset / m)
    return replace(n, params={**n.params, "offset": np.zeros_like(offset)})


def _add_bias(conv: Node, steps: np.ndarray) -> None:
    b = np.asarray(conv.params["bias"], np.int64)
    b = b + P.round_half_up_np(np.broadcast_to(steps, b.shape)).astype(np.int64)
    if accumulator_bound(replace(conv, params={**conv.params, "bias": b})) > INT32_MAX:
        raise DFQFError(f"{conv.name}: folding the requantize bias could overflow the int32 accumulator")
    conv.params["bias"] = b.astype(np.int32)


def term_scale(n: Node, graph: IntGraph) -> float:
    """The scale of the int8 terms a sum `n` is split into: (qmax - qmin) * s_y / 127, the output's whole range
    on either side of zero (a term is clipped only where the sum saturates anyway); per-tensor sums only."""
    out = graph.tensors[n.name]
    if len(out.scale) != 1:
        raise DFQFError(f"{n.name}: a per-channel quantized sum cannot be split into int8 terms for ORT")
    return (n.attrs["qmax"] - n.attrs["qmin"]) * out.scale[0] / 127


def _term(n: Node, i: int, conv: Node, graph: IntGraph, fold: bool) -> tuple[Node, TensorInfo]:
    """The int32 term `i` of sum `n` as its own requantize to int8 at `term_scale` (the sum's offset folded
    into the first such term's conv bias)."""
    out, acc = graph.tensors[n.name], graph.tensors[conv.name]
    s_term = term_scale(n, graph)
    shift = np.asarray(n.params["shift"], np.float64)
    if fold and np.any(n.params["offset"]):  # offset / 2^shift output steps = offset * s_y / 2^shift reals
        real = np.asarray(n.params["offset"], np.float64) / 2.0**shift * out.scale[0]
        _add_bias(conv, real / np.asarray(acc.scale, np.float64))
    channels = len(acc.scale)
    m = (np.asarray(acc.scale, np.float64) / s_term).reshape(1, channels)
    multiplier, shift_t, offset = P.joint_dyadic(m, np.array([accumulator_bound(conv)], dtype=object))
    info = TensorInfo(acc.shape, "int8", 8, True, (float(s_term),), 0)
    node = Node("requantize", f"{conv.name}_term", (conv.name,),
                {"input_zero_points": [0], "output_zero_point": 0, "qmin": -128, "qmax": 127},
                {"multiplier": multiplier, "shift": shift_t, "offset": offset})
    return node, info


def _sum_of_terms(n: Node, terms: list[str], tensors: dict[str, TensorInfo], graph: IntGraph) -> Node:
    """The sum `n` over its (now int8) terms, one rounding, no offset (it went into a conv bias)."""
    s_y = graph.tensors[n.name].scale[0]
    m = np.array([[tensors[t].scale[0] / s_y] for t in terms], np.float64)
    bounds = np.array([max(abs(a - tensors[t].zero_point) for a in tensors[t].qrange) for t in terms], dtype=object)
    multiplier, shift, offset = P.joint_dyadic(m, bounds)
    return replace(n, inputs=tuple(terms),
                   attrs={**n.attrs, "input_zero_points": [tensors[t].zero_point for t in terms]},
                   params={"multiplier": multiplier, "shift": shift, "offset": offset})
