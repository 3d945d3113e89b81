"""Issue 17, the ONNX export on ORT's fused path: the fast variant runs every conv and add on ORT's int8
kernels; `--for-ort` restructures the integer graph so that those kernels compute it (biases in the int32
accumulators, residual convs rounded to int8 before the add), TVM runs that graph bit for bit, and ORT's
codes are compared with it layer by layer (`runtime.ort.OrtCodes`, reported by `runtime.parity`)."""
from __future__ import annotations

import numpy as np
import pytest

from lower import reference as R
from lower.onnx_export import VARIANTS, save_onnx, to_onnx_qdq
from lower.ort_graph import for_ort
from runtime.ort import OrtCodes, ort_optimized_ops
from toolkit import assert_exact, residual_net, smooth_pixels


def _ints(g, x):
    ints: dict[str, np.ndarray] = {}
    out = R.run_graph(g, x, ints.__setitem__)
    return out.astype(np.float64) * g.output_scale, ints


@pytest.mark.parametrize("bits", [8, 4])
def test_for_ort_graph_structure(bits) -> None:
    g = residual_net(bits, bits)
    o = for_ort(g)
    by_name = {n.name: n for n in o.nodes}
    for n in o.nodes:
        if n.op == "requantize":
            if any(by_name[t].op == "conv2d" for t in n.inputs) or n.name.endswith("_term"):
                assert not np.any(n.params["offset"]), n.name  # a conv's bias is in its int32 accumulator
            if len(n.inputs) > 1:  # a sum adds 8-bit terms only: QLinearAdd
                assert all(o.tensors[t].dtype != "int32" for t in n.inputs), n.name
    assert by_name["conv2_term"].inputs == ("conv2",) and o.tensors["conv2_term"].dtype == "int8"
    assert by_name["act2"].inputs == ("conv2_term", "act1") and o.meta["structure"] == "ort"
    assert np.any(by_name["act3"].params["offset"])  # a pool's requantize keeps its bias: no conv to fold it into
    assert not np.array_equal(by_name["conv1"].params["bias"], g.node("conv1").params["bias"])  # folded
    assert g.node("conv1").params["bias"] is not by_name["conv1"].params["bias"]  # the input graph is untouched


@pytest.mark.parametrize("bits", [8, 4])
def test_for_ort_graph_stays_close_to_the_default_graph(bits) -> None:
    """Two roundings instead of one in the residual block and a bias at accumulator precision: per layer at
    most one code away where the inputs agree, and the logits nearly the same."""
    g = residual_net(bits, bits)
    x = smooth_pixels(256, seed=5)
    want, a = _ints(g, x)
    got, b = _ints(for_ort(g), x)
    assert np.abs(b["act1"].astype(np.int64) - a["act1"]).max() <= 1
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()


@pytest.mark.parametrize("bits", [8, 4])
def test_tvm_runs_the_for_ort_graph_bit_exactly(bits) -> None:
    assert_exact(for_ort(residual_net(bits, bits)))


@pytest.mark.parametrize("structure", ["default", "ort"])
def test_fast_variant_is_all_fused_int8(structure, tmp_path) -> None:
    g = residual_net(8, 8)
    g = for_ort(g) if structure == "ort" else g
    ops = ort_optimized_ops(to_onnx_qdq(g, **VARIANTS["fast"]), tmp_path)
    assert ops["QLinearConv"] == 2 and ops["QLinearAdd"] == 1 and ops["Conv"] == 0, ops
    exact = ort_optimized_ops(to_onnx_qdq(residual_net(8, 8), **VARIANTS["exact"]), tmp_path)
    assert exact["QLinearConv"] == 0 and exact["Conv"] == 2, exact  # the exact variant: float convs


@pytest.mark.parametrize("bits", [8, 4])
def test_ort_codes_of_the_fast_export_match_the_for_ort_graph(bits, tmp_path) -> None:
    """What ORT's fused kernels compute, layer by layer, against the restructured integer graph: at most one
    code apart (float32 requantizers, ties to even), on almost no element; against the default graph the
    double rounding shows."""
    g = for_ort(residual_net(bits, bits))
    path = save_onnx(to_onnx_qdq(g, **VARIANTS["fast"]), tmp_path / "fast.onnx")
    run = OrtCodes(path, g)
    assert {"act1", "conv2_term", "act2", "act3"} <= set(run.tensors)
    x = smooth_pixels(512, seed=9)
    want, ints = _ints(g, x)
    logits, codes = run(x)
    for t in run.tensors:
        d = np.abs(codes[t] - ints[t].astype(np.int64))
        assert d.max() <= 1 and (d > 0).mean() <= 0.01, (t, d.max(), (d > 0).mean())
    assert (logits.argmax(1) == want.argmax(1)).mean() >= 0.99


def test_exact_variant_codes_include_4bit_tensors(tmp_path) -> None:
    """INT4/UINT4 activations (numpy has no 4-bit types) come back through a Cast, in the graph's convention."""
    g = residual_net(4, 4)
    run = OrtCodes(save_onnx(to_onnx_qdq(g, **VARIANTS["exact"]), tmp_path / "exact.onnx"), g)
    x = smooth_pixels(64, seed=2)
    _, ints = _ints(g, x)
    _, codes = run(x)
    assert {"act1", "act2"} <= set(codes)
    for t in codes:
        assert np.abs(codes[t] - ints[t].astype(np.int64)).max() <= 1, t


def test_ort_table_rows_name_the_engines_bench_times() -> None:
    """benchmarks.ort_table reads bench's engine names back; a renamed engine would leave its cells empty."""
    from benchmarks.engines import ort_engine_name
    from benchmarks.ort_table import engines, markdown

    for bits in ("int8", "int4"):
        names = engines(bits)
        assert {ort_engine_name(v, a) for v in ("exact", "fast") for a in (bits, f"{bits}b")} <= set(names)
    row = {"bits": "int8", "graph": "ort", "variant": "fast", "agreement_with_integer": 0.9991, "max_code_diff": 11,
           "integer_top1": 88.32, "integer_vs_fakequant_agreement": 0.9932, "ms": {"b1t1": 0.57, "b128t1": None},
           "vs_ort_int8": {"b1t1": 0.956, "b128t1": None}}
    md = markdown({"environment": {"cpu": "CPU X"}, "rows": [row], "ort_int8_ms": {"int8": {"b1t1": 0.596}},
                   "command": "python -m benchmarks.ort_table", "seconds": 1.0})
    assert "| int8 | ort | fast | 99.91% | 11 | 88.32 | 99.32% | 0.57 (0.96×) | – |" in md
    assert "b1t1 0.596 ms" in md and "CPU X" in md
