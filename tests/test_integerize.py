"""Integer graph: exact op semantics against plain-Python/NumPy loops, the integerizer against the
fake-quant student (in LSBs), int4 packing, and the artifact folder."""
from __future__ import annotations

import copy
import json
import operator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import DFQFError
from core.pixels import normalize
from lower import reference as R
from lower.artifact import PARAMS, load_graph, read_manifest, stored_params, write_artifact
from lower.int4 import pack_int4, unpack_int4
from lower.integerize import integerize, supported_ops
from runtime.compare import LayerDiffs, fakequant_values, isolated_layer_diffs, student_codes
from train.quant.primitives import joint_dyadic


# -- reference ops against direct loops -------------------------------------------------------------
def _conv_loops(x, w, b, stride, pad, zp):
    n, cin, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, o, oh, ow), dtype=object)
    for ni in range(n):
        for oi in range(o):
            for y in range(oh):
                for xx in range(ow):
                    acc = int(b[oi])
                    for ci in range(cin):
                        for i in range(kh):
                            for j in range(kw):
                                yy, xj = y * stride + i - pad, xx * stride + j - pad
                                if 0 <= yy < h and 0 <= xj < wd:
                                    acc += (int(x[ni, ci, yy, xj]) - zp) * int(w[oi, ci, i, j])
                    out[ni, oi, y, xx] = acc
    return out.astype(np.int64)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(0, 1), st.integers(0, 255), st.integers(0, 2**31 - 1))
def test_conv2d_matches_loops(stride, ksize, pad, zp, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (2, 3, 5, 5))
    w = rng.integers(-127, 128, (4, 3, ksize, ksize))
    b = rng.integers(-2**20, 2**20, 4)
    got = R.conv2d(x, w, b, (stride, stride), (pad, pad), (1, 1), 1, zp)
    np.testing.assert_array_equal(got, _conv_loops(x, w, b, stride, pad, zp))


def test_grouped_conv_is_per_group_conv():
    rng = np.random.default_rng(0)
    x, w, b = rng.integers(0, 16, (1, 4, 6, 6)), rng.integers(-7, 8, (6, 2, 3, 3)), rng.integers(-99, 99, 6)
    got = R.conv2d(x, w, b, (1, 1), (1, 1), (1, 1), 2, 3)
    halves = [R.conv2d(x[:, 2 * g:2 * g + 2], w[3 * g:3 * g + 3], b[3 * g:3 * g + 3], (1, 1), (1, 1), (1, 1), 1, 3)
              for g in range(2)]
    np.testing.assert_array_equal(got, np.concatenate(halves, axis=1))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-2**24, 2**24), min_size=1, max_size=6), st.integers(2**30, 2**31 - 1),
       st.integers(2**30, 2**31 - 1), st.integers(20, 45), st.integers(-3, 3), st.integers(-2**50, 2**50))
def test_requantize_two_terms_matches_python_ints(accs, m_a, m_b, shift, zp, off):
    """One rounding of the whole sum: floor((a*Ma + b*Mb + offset) / 2^n + 1/2), Python's exact big ints."""
    a = np.array([accs])
    b = np.array([[v % 256 for v in accs]])
    got = R.requantize([a, b], np.array([[m_a], [m_b]]), np.array([shift]), np.array([off]), [0, 7], zp, -128, 127)
    want = [max(-128, min(127, zp + ((x * m_a + (y - 7) * m_b + off + (1 << (shift - 1))) >> shift)))
            for x, y in zip(a[0], b[0])]
    assert got[0].tolist() == want


def test_requantize_per_channel_shift_and_zero_shift():
    acc = np.array([[[[5]], [[5]]]])  # N=1, C=2, 1x1
    got = R.requantize([acc], np.array([[3, 1 << 30]]), np.array([0, 31]), np.array([0, 0]), [0], 0, 0, 255)
    assert got.ravel().tolist() == [15, 3]  # 5*3 (no rounding term), round(5/2) = 3 (half up)


def test_pools_slice_pad_match_numpy_loops():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 16, (2, 3, 6, 6))
    np.testing.assert_array_equal(R.sum_pool2d(x, (6, 6), (6, 6))[:, :, 0, 0], x.sum(axis=(2, 3)))
    mp = R.max_pool2d(x, (3, 3), (2, 2), (1, 1))
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-1)
    want = np.array([[[[padded[n, c, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max() for j in range(3)] for i in range(3)]
                      for c in range(3)] for n in range(2)])
    np.testing.assert_array_equal(mp, want)
    np.testing.assert_array_equal(R.strided_slice(x, [0, 0, 0, 0], [9, 9, 9, 9], [1, 1, 2, 2]), x[:, :, ::2, ::2])
    assert R.pad(x, [[0, 0], [2, 2], [0, 0], [0, 0]], 5)[:, :2].min() == 5


# -- joint dyadic multipliers ------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(1e-7, 0.9), min_size=1, max_size=3), st.integers(1, 2**30))
def test_joint_dyadic_is_accurate_and_cannot_overflow(ms, bound):
    m = np.array(ms).reshape(-1, 1)
    bounds = np.array([bound] * len(ms), dtype=object)
    m0, n, off = joint_dyadic(m, bounds, np.array([-3.75]))
    assert m0.max() < 2**31 and n[0] <= 62
    top = int(np.argmax(m[:, 0]))
    assert abs(int(m0[top, 0]) / 2.0 ** int(n[0]) - m[top, 0]) <= m[top, 0] * 2.0**-29
    assert abs(int(off[0]) / 2.0 ** int(n[0]) + 3.75) <= 2.0 ** -int(n[0])
    assert sum(bound * int(v) for v in m0[:, 0]) + abs(int(off[0])) + (1 << max(int(n[0]) - 1, 0)) < 2**63


# -- int4 packing ------------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-8, 7), min_size=1, max_size=33))
def test_int4_round_trip(values):
    v = np.array(values)
    packed = pack_int4(v)
    assert packed.dtype == np.uint8 and packed.size == (v.size + 1) // 2
    np.testing.assert_array_equal(unpack_int4(packed, v.shape), v)


def test_int4_rejects_out_of_range_and_wrong_size():
    with pytest.raises(DFQFError):
        pack_int4(np.array([8]))
    with pytest.raises(DFQFError):
        unpack_int4(np.zeros(3, np.uint8), (8,))


# -- the integerizer against the fake-quant student ---------------------------------------------------
def _pixels(info, n=32, seed=5):
    c, h, w = info.input_size
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


@pytest.mark.parametrize("bits", [(8, 8), (4, 4), (3, 5), (4, 4, 8)])  # (4, 4, 8): 8-bit residual stream
def test_integer_graph_matches_fakequant_student(tiny_students, bits):
    student, info = tiny_students(*bits)
    g = integerize(student, info.mean, info.std, info.input_size)
    px = _pixels(info)
    ints: dict[str, np.ndarray] = {}
    out = R.run_graph(g, px, observe=ints.__setitem__)
    diffs = LayerDiffs(g)
    fq_values = fakequant_values(student, normalize(px, info.mean, info.std).contiguous(), set(diffs.names))
    codes = student_codes(g, fq_values)
    diffs.update(codes, ints)
    report = diffs.report()
    assert report["input_aq"]["max_lsb"] == 0  # the pixel lookup table is exact
    assert report["relu_aq"]["mismatch_fraction"] < 0.01  # float rounding in the student flips rare ties
    # each layer alone, fed the student's codes: at most one code off, at ties
    isolated = isolated_layer_diffs(g, codes, px)
    assert set(isolated) == set(diffs.names) and max(isolated.values()) <= 1, isolated
    with torch.no_grad():
        fq = student(normalize(px, info.mean, info.std).contiguous()).double().numpy()
    logits = out * g.output_scale
    # end to end, one-code flips propagate; on this random untrained net logits are close to tied, so
    # argmax agreement is loose here (benchmarks/ and runtime.parity measure it on trained ResNets)
    assert (logits.argmax(1) == fq.argmax(1)).mean() >= 0.9
    assert np.abs(logits - fq).mean() < 0.1 * fq.std()


def test_integer_graph_structure(tiny_students):
    student, info = tiny_students(4, 4)
    g = integerize(student, info.mean, info.std, info.input_size)
    ops = [n.op for n in g.nodes]
    assert ops[0] == "quantize_input" and ops[-1] == "dense"
    assert {"conv2d", "requantize", "sum_pool2d", "strided_slice", "pad", "reshape"} <= set(ops)
    residual = [n for n in g.nodes if n.op == "requantize" and len(n.inputs) == 2]
    assert len(residual) == 2  # both residual adds fused into the requantization of their conv
    bits = {n.name: n.attrs["weight_bits"] for n in g.nodes if n.op in ("conv2d", "dense")}
    assert bits["conv1"] == bits["linear"] == 8 and bits["layer1_0_conv1"] == 4
    for n in g.nodes:
        if n.op in ("conv2d", "dense"):
            b = n.attrs["weight_bits"]
            assert np.abs(n.params["weight"]).max() <= 2 ** (b - 1) - 1
        if n.op == "requantize":
            assert n.params["multiplier"].max() < 2**31 and n.params["multiplier"].dtype == np.int64
    assert g.tensors["layer1_0_relu1_aq"].dtype == "uint8" and g.tensors["layer1_0_relu1_aq"].bits == 4


def test_unsupported_layer_names_the_supported_ones(tiny_students):
    student, info = tiny_students(8, 8)
    gm = copy.deepcopy(student)  # the fixture is shared: edit a copy
    relu = next(n for n in gm.graph.nodes if n.name == "relu")
    with gm.graph.inserting_after(relu):
        tanh = gm.graph.call_function(torch.tanh, (relu,))
    relu.replace_all_uses_with(tanh)
    tanh.args = (relu,)
    gm.recompile()
    with pytest.raises(DFQFError, match="cannot lower tanh.*supported: .*Conv"):
        integerize(gm, info.mean, info.std, info.input_size)
    assert "AdaptiveAvgPool2d" in supported_ops() and operator.add.__name__ in supported_ops()


def test_reference_rejects_wrong_images(tiny_students):
    student, info = tiny_students(8, 8)
    g = integerize(student, info.mean, info.std, info.input_size)
    with pytest.raises(DFQFError, match="expected uint8 images of shape"):
        R.run_graph(g, np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(DFQFError, match="expected uint8 images of shape"):
        R.run_graph(g, np.zeros((1, 3, 16, 16), np.uint8))


# -- artifact folder ------------------------------------------------------------------------------------
def test_artifact_round_trip_packs_int4_and_detects_corruption(tiny_students, tmp_path: Path):
    student, info = tiny_students(4, 4)
    g = integerize(student, info.mean, info.std, info.input_size)
    out = tmp_path / "art"
    manifest = write_artifact(out, g, {"target": "none"}, {"note.txt": lambda p: p.write_text("hi")})
    assert set(manifest["files"]) == {"graph.json", PARAMS, "note.txt"}
    assert not list(tmp_path.glob(".art.*"))  # no temp folder left behind
    stored = stored_params(g)
    assert stored["layer1_0_conv1/weight"].dtype == np.uint8  # 4-bit: packed
    assert stored["layer1_0_conv1/weight"].size == (g.node("layer1_0_conv1").params["weight"].size + 1) // 2
    assert stored["conv1/weight"].dtype == np.int8  # first layer stays 8-bit
    back = load_graph(out)
    px = _pixels(info, 4)
    np.testing.assert_array_equal(R.run_graph(back, px), R.run_graph(g, px))
    with pytest.raises(DFQFError, match="already exists"):
        write_artifact(out, g, {})
    data = bytearray((out / PARAMS).read_bytes())
    data[len(data) // 2] ^= 1
    (out / PARAMS).write_bytes(bytes(data))
    with pytest.raises(DFQFError, match="does not match its sha256"):
        read_manifest(out)
    (out / "note.txt").unlink()
    with pytest.raises(DFQFError, match="missing"):
        load_graph(out)
    (out / "manifest.json").write_text("{")
    with pytest.raises(DFQFError, match="not a valid manifest"):
        read_manifest(out)
    assert json.loads((out / "graph.json").read_text())["packed_int4"]


def test_non_positive_weight_step_is_named(tiny_students):
    """A learned weight step at or below zero (a student trained before steps were kept positive) is one
    error naming the layer and channel, not a malformed accumulator scale."""
    student, info = tiny_students(8, 8)
    gm = copy.deepcopy(student)
    conv = next(m for m in gm.modules() if hasattr(m, "weight_quantizer") and m.weight_quantizer.scale.numel() > 2)
    with torch.no_grad():
        conv.weight_quantizer.scale[2] = -7.6e-4
    with pytest.raises(DFQFError, match=r"output channel 2 is -0.00076 \(1 channel\(s\) not positive\)"):
        integerize(gm, info.mean, info.std, info.input_size)
