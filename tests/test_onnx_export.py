"""ONNX QDQ export (lower.onnx_export): ONNX Runtime against the NumPy reference executor on tiny
hand-made integer graphs, stated in output LSBs (ORT rounds in float32, half to even: not bit-exact)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lower import reference as R
from lower.graph import IntGraph, Node, TensorInfo
from lower.onnx_export import CONVERTERS, ort_optimized_ops, ort_session, save_onnx, to_onnx_qdq
from train.errors import DFQFError
from train.quant.primitives import dyadic_multiplier

MEAN, STD = np.array([0.49, 0.48, 0.45]), np.array([0.25, 0.24, 0.26])


def _shared_shift_dyadic(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """m [k, C] -> (M0 [k, C], shift [C]): one shift per channel, set by the largest term."""
    _, shift = dyadic_multiplier(m.max(axis=0))
    return np.floor(m * 2.0 ** shift + 0.5).astype(np.int64), shift


class _GraphMaker:
    """Builds an IntGraph node by node, running the reference on calibration pixels to pick realistic
    scales (each activation scale covers the 99.9th percentile of its real values)."""

    def __init__(self, pixels: np.ndarray, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[Node] = []
        self.tensors: dict[str, TensorInfo] = {}
        self.values = {"pixels": pixels}
        self.biases: dict[str, np.ndarray] = {}  # real conv biases, added by the requantize that reads the conv
        self.pixels = pixels

    def add(self, node: Node, info: TensorInfo) -> str:
        self.nodes.append(node)
        self.tensors[node.name] = info
        self.values[node.name] = R._run_node(node, [self.values[i] for i in node.inputs])
        return node.name

    def real(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        s = np.asarray(t.scale).reshape((1, -1) + (1,) * (self.values[name].ndim - 2))
        return s * (self.values[name] - t.zero_point)

    def quantize_input(self, name: str) -> str:
        norm = (np.arange(256)[None, :] / 255 - MEAN[:, None]) / STD[:, None]  # [C, 256]
        s = np.abs(norm).max() / 127
        lut = np.clip(np.floor(norm / s + 0.5), -128, 127).astype(np.int32)
        shape = (3, *self.pixels.shape[1:3])
        return self.add(Node("quantize_input", name, ("pixels",), {}, {"lut": lut}),
                        TensorInfo(shape, "int8", 8, True, (s,), 0))

    def linear(self, name: str, x: str, out: int, wbits: int, conv: bool, logits: bool = False) -> str:
        """conv2d (3x3, pad 1) or dense; its real bias goes to the next requantize, or into the int32 bias
        at the accumulator scale for the logits layer (as lower.integerize does)."""
        xi = self.tensors[x]
        qw = 2 ** (wbits - 1) - 1
        cin = xi.shape[0]
        wshape = (out, cin, 3, 3) if conv else (out, cin)
        w = self.rng.integers(-qw, qw + 1, wshape).astype(np.int8)
        s_w = self.rng.uniform(0.5, 1.0, out) * np.sqrt(2 / np.prod(wshape[1:])) / qw * 2
        acc_scale = xi.scale[0] * s_w
        real_bias = self.rng.normal(0, 0.1, out)
        bias = np.floor(real_bias / acc_scale + 0.5).astype(np.int32) if logits else np.zeros(out, np.int32)
        if not logits:
            self.biases[name] = real_bias
        attrs = {"input_zero_point": xi.zero_point, "weight_bits": wbits}
        if conv:
            attrs.update(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)
            shape = (out, *xi.shape[1:])
        else:
            shape = (out,)
        return self.add(Node("conv2d" if conv else "dense", name, (x,), attrs, {"weight": w, "bias": bias}),
                        TensorInfo(shape, "int32", 32, True, tuple(acc_scale), 0))

    def requantize(self, name: str, terms: tuple[str, ...], bits: int, signed: bool, zp: int, relu: bool,
                   bias: np.ndarray | None = None) -> str:
        """Round sum(terms) + bias (+ the real biases of conv terms) once, with realistic scale and multipliers."""
        channels = max(len(self.tensors[t].scale) for t in terms)
        bias = np.zeros(channels) if bias is None else bias
        bias = bias + sum(self.biases.get(t, 0) for t in terms)
        per_channel = (1, -1) + (1,) * (self.values[terms[0]].ndim - 2)
        total = sum(self.real(t) for t in terms) + bias.reshape(per_channel)
        if relu:
            total = np.maximum(total, 0)
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        s_y = float(np.quantile(np.abs(total), 0.999)) / (qmax - zp if relu else (qmax - qmin) / 2)
        m = np.stack([np.broadcast_to(self.tensors[t].scale, (channels,)) / s_y for t in terms])
        multiplier, shift = _shared_shift_dyadic(m)
        offset = np.floor(bias / s_y * 2.0 ** shift + 0.5).astype(np.int64)
        attrs = {"input_zero_points": [self.tensors[t].zero_point for t in terms], "output_zero_point": zp,
                 "qmin": max(qmin, zp) if relu else qmin, "qmax": qmax}
        shape = self.tensors[terms[0]].shape
        return self.add(Node("requantize", name, terms, attrs, {"multiplier": multiplier, "shift": shift, "offset": offset}),
                        TensorInfo(shape, "int8" if signed else "uint8", bits, signed, (s_y,), zp))

    def same_grid(self, op: str, name: str, x: str, out_shape: tuple[int, ...], **attrs) -> str:
        xi = self.tensors[x]
        return self.add(Node(op, name, (x,), attrs), TensorInfo(out_shape, xi.dtype, xi.bits, xi.signed, xi.scale,
                                                                xi.zero_point))

    def graph(self) -> IntGraph:
        h, w, c = self.pixels.shape[1:]
        return IntGraph("pixels", (h, w, c), self.nodes, self.tensors, self.nodes[-1].name)


def _pixels(n: int, seed: int) -> np.ndarray:
    """Smooth-ish random 8x8 RGB images (a coarse random field, upsampled, plus noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, 2, 2, 3)).repeat(4, axis=1).repeat(4, axis=2)
    return np.clip(coarse + rng.normal(0, 30, coarse.shape), 0, 255).astype(np.uint8)


def residual_net(wbits: int, abits: int, seed: int = 0) -> IntGraph:
    """quantize_input -> conv(8b) -> requantize(relu, abits) -> conv(wbits) -> requantize(acc + residual, relu,
    abits) -> global sum_pool2d -> requantize(8b signed, zp -10) -> reshape -> dense(8b): 10 int32 logits.
    Conv biases are real offsets in the requantize nodes (the ONNX export folds them into the conv bias);
    act3 has a bias of its own (an Add in ONNX)."""
    m = _GraphMaker(_pixels(256, seed + 100), seed)
    x = m.quantize_input("input_q")
    a1 = m.requantize("act1", (m.linear("conv1", x, 8, 8, conv=True),), abits, False, 0, relu=True)
    a2 = m.requantize("act2", (m.linear("conv2", a1, 8, wbits, conv=True), a1), abits, False, 0, relu=True)
    pool = m.add(Node("sum_pool2d", "pool", (a2,), {"kernel": [8, 8], "stride": [8, 8]}),
                 TensorInfo((8, 1, 1), "int32", 32, True, (m.tensors[a2].scale[0] / 64,), 64 * m.tensors[a2].zero_point))
    a3 = m.requantize("act3", (pool,), 8, True, -10, relu=False, bias=np.linspace(-0.2, 0.2, 8))
    flat = m.same_grid("reshape", "flat", a3, (8,), shape=[8])
    m.linear("fc", flat, 10, 8, conv=False, logits=True)
    return m.graph()


def grid_ops_net(seed: int = 0) -> IntGraph:
    """Ops that are exact on the integer grid: pad (zero point), max_pool2d, strided_slice, clamp."""
    m = _GraphMaker(_pixels(64, seed + 200), seed)
    x = m.quantize_input("input_q")
    p = m.same_grid("pad", "pad", x, (3, 10, 10), pads=[[0, 0], [0, 0], [1, 1], [1, 1]], value=0)
    mp = m.same_grid("max_pool2d", "maxpool", p, (3, 5, 5), kernel=[3, 3], stride=[2, 2], padding=[1, 1])
    sl = m.same_grid("strided_slice", "slice", mp, (2, 3, 4), begin=[0, 1, 0, 1], end=[2**31 - 1, 3, 5, 5],
                     step=[1, 1, 2, 1])
    c = m.same_grid("clamp", "clamp", sl, (2, 3, 4), qmin=-20, qmax=50)
    flat = m.same_grid("reshape", "flat", c, (24,), shape=[-1])
    m.linear("fc", flat, 10, 8, conv=False, logits=True)
    return m.graph()


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the real values `{name}/real` (per-layer comparison)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in names:
        out.graph.output.append(onnx.helper.make_tensor_value_info(f"{n}/real", onnx.TensorProto.FLOAT, None))
    return out


def _layer_reals(g: IntGraph, pixels: np.ndarray) -> dict[str, np.ndarray]:
    reals: dict[str, np.ndarray] = {}

    def observe(name, t):
        info = g.tensors[name]
        s = np.asarray(info.scale).reshape((1, -1) + (1,) * (t.ndim - 2))
        reals[name] = s * (t.astype(np.int64) - info.zero_point)

    R.run_graph(g, pixels, observe)
    return reals


# Agreement, stated in LSBs. Each requantize output may differ by at most 1 LSB (a tie rounded to even, a
# float32 rounding, or the folded bias off by <= half an accumulator step; the flips then propagate a little).
# Measured on 1000 images, fraction of elements that differ (act1 / act2 / act3):
#   fold_bias=True:  W8A8 0.04 % / 0.24 % / 0.2 %, W4A4 0 / 0.5 % / 8.9 % (act3 averages 64 act2 values);
#                    logits max diff 0.3 % (W8A8) / 1.1 % (W4A4) of their span, argmax 99.9 % / 99.1 %.
#   fold_bias=False: 0 everywhere (no tie hit on these images).
LAYER_LSB, LOGIT_REL, ARGMAX_AGREE = 1, 0.03, 0.97
DIFFERING = {True: 0.15, False: 0.001}


@pytest.mark.parametrize("wbits,abits,int4,fold_bias", [(8, 8, True, True), (8, 8, True, False),
                                                        (4, 4, True, True), (4, 4, False, True),
                                                        (4, 4, True, False)])
def test_ort_matches_reference(tmp_path, wbits, abits, int4, fold_bias):
    g = residual_net(wbits, abits)
    model = to_onnx_qdq(g, int4=int4, fold_bias=fold_bias)
    path = save_onnx(model, tmp_path / "model.onnx")  # runs onnx.checker (full check)
    pixels = _pixels(200, seed=7)
    want = R.run_graph(g, pixels).astype(np.float64) * g.output_scale
    got = ort_session(path)(pixels)
    assert got.dtype == np.float32 and got.shape == want.shape

    span = want.max() - want.min()
    assert np.abs(got - want).max() <= LOGIT_REL * span
    assert (got.argmax(1) == want.argmax(1)).mean() >= ARGMAX_AGREE

    layers = ["input_q", "act1", "act2", "act3"]
    sess = ort.InferenceSession(_with_outputs(model, layers).SerializeToString(), providers=["CPUExecutionProvider"])
    ort_reals = dict(zip(layers, sess.run([f"{n}/real" for n in layers], {"pixels": pixels})))
    ref_reals = _layer_reals(g, pixels)
    np.testing.assert_allclose(ort_reals["input_q"], ref_reals["input_q"], rtol=1e-6, atol=0)  # the LUT is exact
    for n in layers[1:]:
        diff = np.abs(ort_reals[n] - ref_reals[n]) / g.tensors[n].scale[0]
        assert diff.max() <= LAYER_LSB + 1e-3, f"{n}: {diff.max():.2f} LSB"
        assert (diff > 1e-3).mean() <= DIFFERING[fold_bias], f"{n}: {(diff > 1e-3).mean():.2%} differ"


def test_grid_ops_are_exact():
    """pad, max_pool2d, strided_slice, clamp, reshape lose nothing: logits agree to float32 precision."""
    g = grid_ops_net()
    pixels = _pixels(64, seed=3)
    want = R.run_graph(g, pixels).astype(np.float64) * g.output_scale
    got = ort_session(to_onnx_qdq(g))(pixels)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def _producer_op(model: onnx.ModelProto, name: str) -> str:
    return next(n.op_type for n in model.graph.node if name in n.output)


def _qdq_around_conv(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """For every Conv: (op feeding its activation input, op of its consumer)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return [(producer[c.input[0]].op_type, consumers[c.output[0]][0].op_type)
            for c in model.graph.node if c.op_type == "Conv"]


def test_model_is_qdq_and_ort_fuses_int8(tmp_path):
    model = to_onnx_qdq(residual_net(8, 8))
    for c in (n for n in model.graph.node if n.op_type == "Conv"):
        assert all(_producer_op(model, i) == "DequantizeLinear" for i in c.input)  # x, w, b all DQ
    assert ("DequantizeLinear", "QuantizeLinear") in _qdq_around_conv(model)  # conv1 -> act1: plain QDQ
    weights = [t for t in model.graph.initializer if t.name.endswith("/weight")]
    assert {t.data_type for t in weights} == {onnx.TensorProto.INT8}

    ops = ort_optimized_ops(model, tmp_path)
    assert ops["QLinearConv"] == 1 and ops["QGemm"] == 1, ops  # ORT's u8 x s8 fast path (conv2 has a residual)
    # 4-bit values in uint8: the clamp to [0, 15] is a uint8 Clip after Q, so conv1 still fuses
    assert ort_optimized_ops(to_onnx_qdq(residual_net(4, 4), int4=False), tmp_path)["QLinearConv"] == 1


def test_int4_weights_and_activations_are_4bit_types():
    model = to_onnx_qdq(residual_net(4, 4), int4=True)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types["conv2/weight"] == onnx.TensorProto.INT4 and types["conv1/weight"] == onnx.TensorProto.INT8
    assert types["act1/zero_point"] == onnx.TensorProto.UINT4
    assert not any(n.op_type == "Clip" and n.name.startswith("act1") for n in model.graph.node)  # uint4 saturates
    model8 = to_onnx_qdq(residual_net(4, 4), int4=False)
    types8 = {t.name: t.data_type for t in model8.graph.initializer}
    assert types8["conv2/weight"] == onnx.TensorProto.INT8 and types8["act1/zero_point"] == onnx.TensorProto.UINT8
    assert any(n.op_type == "Clip" and n.name.startswith("act1") for n in model8.graph.node)  # clip to [0, 15]


def test_unsupported_op_lists_supported():
    g = residual_net(8, 8)
    g.nodes[1].op = "softmax"  # bypasses validation: the exporter must still refuse it
    with pytest.raises(DFQFError, match="supported: " + ", ".join(CONVERTERS)):
        to_onnx_qdq(g)


def test_symbolic_batch():
    g = residual_net(8, 8)
    run = ort_session(to_onnx_qdq(g))
    for n in (1, 3):
        assert run(_pixels(n, seed=n)).shape == (n, 10)
    with pytest.raises(DFQFError):
        run(np.zeros((1, 8, 8, 3), np.float32))
