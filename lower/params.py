"""The compiled module's parameters: their order, dtypes and packing (shared by the builder and the runtime)."""
from __future__ import annotations

import numpy as np

from core.errors import DFQFError

from .graph import OPS, IntGraph, Node
from .int4 import pack_int4

PARAM_DTYPES = {"lut": "int32", "weight": "int8", "bias": "int32", "multiplier": "int64", "shift": "int64",
                "offset": "int64"}
INT4_BITS = 4


def packed_param(node: Node, key: str) -> bool:
    """Whether a node's parameter is passed packed two per byte (weights of <= 4 bits)."""
    return key == "weight" and int(node.attrs.get("weight_bits", 8)) <= INT4_BITS


def param_order(g: IntGraph) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) of main's parameters after x: nodes in graph order, params in `OPS` order.

    Keys are `IntGraph.param_arrays()` keys ("conv1/weight"). Weights of <= 4 bits are packed uint8.
    """
    order = []
    for n in g.nodes:
        for k in OPS[n.op][2]:
            shape = tuple(int(d) for d in np.shape(n.params[k]))
            if packed_param(n, k):
                order.append((f"{n.name}/{k}", ((int(np.prod(shape)) + 1) // 2,), "uint8"))
            else:
                order.append((f"{n.name}/{k}", shape, PARAM_DTYPES[k]))
    return order


def pack_params(g: IntGraph) -> list[np.ndarray]:
    """The arrays to pass after x, in `param_order` (int4 weights packed); casts are checked to be lossless."""
    arrays = g.param_arrays()
    out = []
    for key, _, dtype in param_order(g):
        a = np.asarray(arrays[key])
        node, k = g.node(key.rsplit("/", 1)[0]), key.rsplit("/", 1)[1]
        if packed_param(node, k):
            out.append(pack_int4(a, signed=True))
            continue
        cast = a.astype(dtype)
        if not np.array_equal(cast, a):
            raise DFQFError(f"parameter {key} does not fit {dtype}")
        out.append(np.ascontiguousarray(cast))
    return out
