"""NumPy reference executor: the exact semantics of every integer op (`lower.graph`), in int64.

Backends (TVM, ONNX Runtime's integer path) are tested bit for bit against `run_graph`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from core.errors import DFQFError
from train.quant import primitives as P

from .graph import IntGraph, Node

Array = np.ndarray


def quantize_input(x: Array, lut: Array) -> Array:
    """out[n, c, h, w] = lut[c, x[n, h, w, c]].

    >>> quantize_input(np.array([[[[0, 255]]]], np.uint8), np.stack([np.arange(256), -np.arange(256)])).tolist()
    [[[[0]], [[-255]]]]
    """
    x = np.asarray(x)
    c = np.arange(x.shape[-1])
    return lut[c, x.astype(np.int64)].transpose(0, 3, 1, 2).astype(np.int64)


def _pad_spatial(x: Array, padding: tuple[int, int], value: int) -> Array:
    ph, pw = padding
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def _windows(x: Array, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> Array:
    """[N, C, OH, OW, kh, kw] view of the sliding windows."""
    kh, kw = kernel
    win = np.lib.stride_tricks.sliding_window_view(x, ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1),
                                                   axis=(2, 3))
    return win[:, :, ::stride[0], ::stride[1], ::dilation[0], ::dilation[1]]


def exact_float(bound: float) -> type:
    """The narrowest float type whose arithmetic is exact on integers up to `bound` in magnitude: float32 below
    2^24, float64 below 2^53. A dot product of integers computed in it by any BLAS/im2col kernel, in any
    summation order, is exact when `bound` bounds the sum of the absolute products (every partial sum and
    every product is then an integer of at most `bound`)."""
    if bound < 2**24:
        return np.float32
    if bound < 2**53:
        return np.float64
    raise DFQFError(f"an integer dot product of bound {bound:.3g} exceeds the exact range of float64")


def _exact_matmul(a: Array, b: Array) -> Array:
    """Integer a @ b through BLAS in the narrowest exact float type (`exact_float`)."""
    dtype = exact_float(float(np.abs(a).max(initial=0)) * float(np.abs(b).sum(axis=0).max(initial=0)))
    return (a.astype(dtype) @ b.astype(dtype)).astype(np.int64)


def conv2d(x: Array, weight: Array, bias: Array, stride, padding, dilation, groups: int, input_zero_point: int) -> Array:
    """acc = sum((x - zp) * w) + bias over each window, in int64; zero padding of (x - zp).

    The dot products run as a torch convolution (direct or im2col + GEMM; NNPACK, whose Winograd and FFT
    transforms would round, is off) in the narrowest exact float type for this layer (`exact_float` of
    max|x - zp| * max_o sum|w_o|), so they are exact integers.

    >>> conv2d(np.array([[[[3, 4], [5, 6]]]]), np.ones((1, 1, 2, 2), np.int8), np.array([1]), (1, 1), (0, 0), (1, 1), 1, 2).tolist()
    [[[[11]]]]
    """
    import torch
    import torch.nn.functional as F

    d = np.asarray(x, np.int64) - input_zero_point
    w = np.asarray(weight, np.int64)
    dtype = exact_float(float(np.abs(d).max(initial=0)) * float(np.abs(w).reshape(len(w), -1).sum(axis=1).max(initial=0)))
    with torch.backends.nnpack.flags(enabled=False), torch.inference_mode():
        acc = F.conv2d(torch.from_numpy(d.astype(dtype)), torch.from_numpy(w.astype(dtype)), None, tuple(stride),
                       tuple(padding), tuple(dilation), int(groups))
    return acc.numpy().astype(np.int64) + np.asarray(bias, np.int64).reshape(1, -1, 1, 1)


def dense(x: Array, weight: Array, bias: Array, input_zero_point: int) -> Array:
    """acc = (x - zp) @ w.T + bias, in int64."""
    return _exact_matmul(np.asarray(x, np.int64) - input_zero_point, np.asarray(weight, np.int64).T) + \
        np.asarray(bias, np.int64)


def sum_pool2d(x: Array, kernel, stride) -> Array:
    return _windows(np.asarray(x, np.int64), tuple(kernel), tuple(stride)).sum(axis=(-2, -1))


def max_pool2d(x: Array, kernel, stride, padding) -> Array:
    x = np.asarray(x, np.int64)
    xs = _pad_spatial(x, tuple(padding), np.iinfo(np.int64).min)
    return _windows(xs, tuple(kernel), tuple(stride)).max(axis=(-2, -1))


def strided_slice(x: Array, begin, end, step) -> Array:
    return x[tuple(slice(b, e, s) for b, e, s in zip(begin, end, step))]


def pad(x: Array, pads, value: int) -> Array:
    return np.pad(x, [tuple(p) for p in pads], constant_values=value)


def reshape(x: Array, shape) -> Array:
    return x.reshape(x.shape[0], *shape)


def requantize(terms: list[Array], multiplier: Array, shift: Array, offset: Array, input_zero_points,
               output_zero_point: int, qmin: int, qmax: int) -> Array:
    """The quant core's requantizer (`train.quant.primitives.requantize`), channels along axis 1.

    >>> requantize([np.array([[10, 15, -10, 1000]])], np.array([[1 << 30]]), np.array([32]), np.array([0]), [0], 0, -8, 7).tolist()
    [[3, 4, -2, 7]]
    """
    return P.requantize(terms, multiplier, shift, offset, input_zero_points, output_zero_point, qmin, qmax, axis=1)


# op -> its executor on (node, input arrays); the graph's op set (`lower.graph.OPS`) and this table agree
# (tests/test_integerize.py checks it)
RunOp = Callable[[Node, list[Array]], Array]
EXECUTORS: dict[str, RunOp] = {
    "quantize_input": lambda n, xs: quantize_input(xs[0], n.params["lut"]),
    "conv2d": lambda n, xs: conv2d(xs[0], n.params["weight"], n.params["bias"], n.attrs["stride"], n.attrs["padding"],
                                   n.attrs["dilation"], n.attrs["groups"], n.attrs["input_zero_point"]),
    "dense": lambda n, xs: dense(xs[0], n.params["weight"], n.params["bias"], n.attrs["input_zero_point"]),
    "requantize": lambda n, xs: requantize(xs, n.params["multiplier"], n.params["shift"], n.params["offset"],
                                           n.attrs["input_zero_points"], n.attrs["output_zero_point"],
                                           n.attrs["qmin"], n.attrs["qmax"]),
    "sum_pool2d": lambda n, xs: sum_pool2d(xs[0], n.attrs["kernel"], n.attrs["stride"]),
    "max_pool2d": lambda n, xs: max_pool2d(xs[0], n.attrs["kernel"], n.attrs["stride"], n.attrs["padding"]),
    "clamp": lambda n, xs: np.clip(xs[0], n.attrs["qmin"], n.attrs["qmax"]),
    "strided_slice": lambda n, xs: strided_slice(xs[0], n.attrs["begin"], n.attrs["end"], n.attrs["step"]),
    "pad": lambda n, xs: pad(xs[0], n.attrs["pads"], n.attrs["value"]),
    "reshape": lambda n, xs: reshape(xs[0], n.attrs["shape"]),
}


def _run_node(n: Node, args: list[Array]) -> Array:
    run = EXECUTORS.get(n.op)
    if run is None:
        raise DFQFError(f"reference executor has no op {n.op!r}")
    return run(n, args)


def run_graph(g: IntGraph, pixels: Array, observe: Callable[[str, Array], Array | None] | None = None) -> Array:
    """Run `g` on uint8 NHWC pixels; returns the int32 output.

    `observe(name, tensor)` sees every node output; when it returns an array, that array replaces the
    node's output downstream (used to feed every layer the fake-quant student's codes, so each layer is
    compared in isolation).

    Every intermediate is checked against its declared value range and stored in its storage dtype, so
    a backend that keeps int32 where the graph says uint8 computes the same numbers.
    """
    pixels = g.check_images(pixels)
    env: dict[str, Array] = {g.input_name: pixels}
    for n in g.nodes:
        y = _run_node(n, [env[i] for i in n.inputs])
        info = g.tensors[n.name]
        lo, hi = info.qrange
        if y.size and (y.min() < lo or y.max() > hi):
            raise DFQFError(f"{n.name} ({n.op}) leaves its {info.bits}-bit range: [{y.min()}, {y.max()}]")
        if tuple(y.shape[1:]) != tuple(info.shape):
            raise DFQFError(f"{n.name} ({n.op}) has shape {list(y.shape[1:])}, graph says {list(info.shape)}")
        env[n.name] = y.astype(info.dtype)
        if observe is not None:
            replacement = observe(n.name, env[n.name])
            if replacement is not None:
                env[n.name] = np.asarray(replacement).astype(info.dtype)
    return env[g.output]
