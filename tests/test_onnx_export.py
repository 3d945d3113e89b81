"""ONNX QDQ export (lower.onnx_export): ONNX Runtime against the NumPy reference executor on tiny
hand-made integer graphs, stated in output LSBs (ORT rounds in float32, half to even: not bit-exact)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from core.errors import DFQFError
from lower import reference as R
from lower.graph import IntGraph
from lower.onnx_export import CONVERTERS, save_onnx, to_onnx_qdq
from runtime.ort import ort_optimized_ops, ort_session
from toolkit import grid_ops_net, residual_net, smooth_pixels


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
    pixels = smooth_pixels(200, seed=7)
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
    pixels = smooth_pixels(64, seed=3)
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
        assert run(smooth_pixels(n, seed=n)).shape == (n, 10)
    with pytest.raises(DFQFError):
        run(np.zeros((1, 8, 8, 3), np.float32))
