"""TVM lowering of the integer graph: bit-exact against the NumPy reference (`lower.reference.run_graph`).

Every test builds a tiny IntGraph by hand, compiles it for llvm (one compile per graph, ~1 s) and runs the
same compiled module at batch 1 and batch 3. CUDA codegen is checked offline (source + nvcc PTX); running
on a GPU is in the `cuda`-marked tests, which skip without one.
"""
from __future__ import annotations

import numpy as np
import pytest
import tvm

from core.errors import DFQFError
from lower import cuda, targets
from lower import tvm_build as tb
from lower.graph import OPS
from lower.int4 import unpack_int4
from lower.reference import EXECUTORS, run_graph
from runtime.executable import load_executable
from toolkit import C, GraphMaker, H, W, all_ops_graph, assert_exact


# -- one test per op kind ------------------------------------------------------------------------------------
def test_quantize_input():  # int8 outputs: the int8 conv2d and max_pool2d tests
    assert_exact(GraphMaker(1, "uint8", 5).graph())


@pytest.mark.parametrize("input_dtype,kw", [
    ("uint8", dict(stride=(1, 1), padding=(1, 1))),
    ("uint8", dict(stride=(2, 1), padding=(0, 2), dilation=(2, 1))),
    ("int8", dict(stride=(2, 2), padding=(1, 1), groups=3)),
    ("uint8", dict(padding=(1, 1), bits=4)),
    ("int8", dict(k=1, stride=(2, 2), padding=(0, 0), groups=3, bits=4)),
])
def test_conv2d(input_dtype, kw):
    m = GraphMaker(2, input_dtype, 17 if input_dtype == "uint8" else -9)  # nonzero input zero point
    m.conv("c", "q", 6, **kw)
    g = m.graph()
    if kw.get("bits", 8) == 8:
        assert np.abs(run_graph(g, m.sample["px"])).max() > 2**15  # accumulators need int32
    assert_exact(g)


@pytest.mark.parametrize("bits", [8, 4])
def test_dense(bits):
    m = GraphMaker(3)
    m.add("reshape", "fl", ["q"], {"shape": [C * H * W]})
    m.dense("fc", "fl", 7, bits=bits)
    assert_exact(m.graph())


@pytest.mark.parametrize("terms,dtype,relu,per_channel", [
    (1, "uint8", False, False), (1, "int8", False, True), (2, "uint8", True, True), (2, "int8", True, False)])
def test_requantize(terms, dtype, relu, per_channel):
    m = GraphMaker(4)
    m.conv("c", "q", 4)
    inputs = ["c", "q2"][:terms]
    if terms == 2:  # a residual: the second term is an 8-bit tensor with its own zero point
        m.conv("c2", "q", 4, k=1, padding=(0, 0))
        m.requantize("q2", ["c2"], zero_point=11)
    m.requantize("y", inputs, dtype=dtype, zero_point=-7 if dtype == "int8" else 9, relu=relu,
                 per_channel=per_channel)
    g = m.graph()
    y = run_graph(g, m.sample["px"])
    lo, hi = g.tensors["y"].qrange
    assert ((y > max(lo, g.node("y").attrs["qmin"])) & (y < hi)).mean() > 0.3  # mostly not clipped
    assert_exact(g)


def test_requantize_rounding_and_tiny_shifts():
    """Ties round half up, negative sums shift arithmetically, shift 0 adds no rounding term."""
    m = GraphMaker(5)
    m.conv("c", "q", 5, k=1, padding=(0, 0))
    m.conv("c0", "q", 5, k=1, padding=(0, 0))
    m.requantize("y", ["c", "c0"], dtype="int8", zero_point=0)
    node = m.nodes[-1]
    node.params["multiplier"] = np.array([[1, 2, 3, 1, 1], [1, 1, 3, 1, 0]], np.int64)
    node.params["shift"] = np.array([0, 1, 2, 9, 12], np.int64)
    node.params["offset"] = np.array([0, -1, 2, -300, 5000], np.int64)
    m.sample["y"] = EXECUTORS["requantize"](node, [m.sample["c"], m.sample["c0"]])
    g = m.graph()
    assert_exact(g)


@pytest.mark.parametrize("kernel,stride", [((8, 8), (8, 8)), ((3, 2), (2, 3))])
def test_sum_pool2d(kernel, stride):
    m = GraphMaker(6)
    m.add("sum_pool2d", "p", ["q"], {"kernel": list(kernel), "stride": list(stride)}, dtype="int32")
    assert_exact(m.graph())


def test_max_pool2d_with_padding():  # int8: the padding (-128) ties real values; uint8: all_ops_graph
    m = GraphMaker(7, "int8", 0)
    m.add("max_pool2d", "p", ["q"], {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]})
    assert_exact(m.graph())


def test_clamp_pad_slice_reshape():
    m = GraphMaker(8)
    m.add("clamp", "cl", ["q"], {"qmin": 30, "qmax": 200})
    m.add("strided_slice", "s1", ["cl"], {"begin": [0, 1, 0, 1], "end": [2**31 - 1, 3, 7, 100], "step": [1, 1, 2, 3]})
    m.add("strided_slice", "s2", ["s1"], {"begin": [0, 0, -1, 0], "end": [2**31 - 1, 2, -5, 3], "step": [1, 1, -1, 1]})
    m.add("pad", "pd", ["s2"], {"pads": [[0, 0], [1, 2], [0, 1], [2, 0]], "value": 5})
    m.add("reshape", "r", ["pd"], {"shape": [-1, 5]})
    assert_exact(m.graph())


# -- whole graphs, parameters, export -------------------------------------------------------------------------
def test_all_ops_graph_export_and_load(tmp_path):
    g = all_ops_graph()
    ex = tb.compile_graph(g)
    assert_exact(g, ex)
    path = tb.export_library(ex, tmp_path / "graph.so")
    run = load_executable(path, "cpu")
    x = np.random.default_rng(9).integers(0, 256, (4, H, W, C), dtype=np.uint8)
    params = run.upload(tb.pack_params(g))
    np.testing.assert_array_equal(run(x, params), run_graph(g, x))


def test_param_order_packs_int4_weights():
    g = all_ops_graph()
    order = tb.param_order(g)
    assert [k for k, _, _ in order] == [f"{n.name}/{p}" for n in g.nodes for p in OPS[n.op][2]]
    shapes = {k: (s, d) for k, s, d in order}
    w = g.node("c2").params["weight"]  # int4: 4 * 2 * 3 * 3 = 72 values -> 36 bytes
    assert shapes["c2/weight"] == ((36,), "uint8") and shapes["c1/weight"] == ((4, 3, 3, 3), "int8")
    packed = dict(zip((k for k, _, _ in order), tb.pack_params(g)))
    np.testing.assert_array_equal(unpack_int4(packed["c2/weight"], w.shape), w)
    assert all(a.shape == s and a.dtype == d for a, (_, s, d) in zip(tb.pack_params(g), order))


def test_odd_sized_int4_weight():
    m = GraphMaker(10)
    m.conv("c", "q", 3, k=3, groups=3, bits=4)  # 27 values: the last byte holds one nibble
    g = m.graph()
    assert tb.param_order(g)[1] == ("c/weight", (14,), "uint8")
    assert_exact(g)


@pytest.mark.parametrize("seed", [11])
def test_random_net(seed):
    rng = np.random.default_rng(seed)
    m = GraphMaker(seed, "uint8", int(rng.integers(0, 20)))
    x = "q"
    for i in range(2):
        groups = int(rng.choice([1, m.tensors[x].shape[0]]))
        x = m.conv(f"c{i}", x, m.tensors[x].shape[0] * int(rng.integers(1, 3)), k=int(rng.choice([1, 3])),
                   stride=tuple(int(s) for s in rng.integers(1, 3, 2)),
                   padding=tuple(int(p) for p in rng.integers(0, 2, 2)),
                   groups=groups, bits=int(rng.choice([4, 8])))
        x = m.requantize(f"r{i}", [x], zero_point=int(rng.integers(0, 30)), relu=bool(rng.integers(0, 2)))
    assert_exact(m.graph())


# -- errors ---------------------------------------------------------------------------------------------------
def test_unknown_op_lists_supported(monkeypatch):
    monkeypatch.delitem(tb.CONVERTERS, "max_pool2d")
    with pytest.raises(DFQFError, match=r"max_pool2d.*supported: quantize_input, conv2d"):
        tb.build_relax(all_ops_graph())


def test_unknown_target_and_option():
    g = GraphMaker().graph()
    with pytest.raises(DFQFError, match="known targets: llvm, cuda"):
        tb.compile_graph(g, "vulkan")
    with pytest.raises(DFQFError, match="takes options mcpu"):
        tb.compile_graph(g, "llvm", arch="sm_80")


def test_target_dicts_are_plain_json():
    assert targets.target_dict("llvm", mcpu="znver4") == {"kind": "llvm", "tag": "", "keys": ["cpu"], "mcpu": "znver4"}
    cuda = targets.target_dict("cuda", arch="sm_90")
    assert cuda["arch"] == "sm_90" and cuda["host"]["kind"] == "llvm" and "mcpu" not in cuda["host"]
    assert targets.target_dict("cuda")["arch"] == "sm_80"


def test_batch_slicing_is_rejected():
    m = GraphMaker()
    m.add("strided_slice", "s", ["q"], {"begin": [1, 0, 0, 0], "end": [2, 3, 8, 8], "step": [1, 1, 1, 1]})
    with pytest.raises(DFQFError, match="batch axis"):
        tb.build_relax(m.graph())


# -- CUDA -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cuda_executable():
    return tb.compile_graph(all_ops_graph(), "cuda", arch="sm_80")


def test_cuda_codegen_without_gpu(cuda_executable, tmp_path):
    source = cuda.cuda_source(cuda_executable)
    assert source.count("__global__") >= 10 and "blockIdx" in source
    assert tb.export_library(cuda_executable, tmp_path / "cuda.so").stat().st_size > 0
    if cuda.find_nvcc() is None:
        pytest.skip("nvcc not found: PTX compilation not checked")
    for arch in ("sm_80", "sm_90"):
        ptx = cuda.compile_cuda_ptx(source, arch)
        assert f".target {arch}" in ptx and ".entry" in ptx


requires_gpu = pytest.mark.skipif(not tvm.cuda().exist, reason="no CUDA GPU")


@pytest.mark.cuda
@requires_gpu
def test_cuda_matches_reference(cuda_executable):
    assert_exact(all_ops_graph(), cuda_executable, device="cuda")


@pytest.mark.cuda
@requires_gpu
def test_cuda_export_load(tmp_path):
    g = all_ops_graph(seed=1)
    path = tb.export_library(tb.compile_graph(g, "cuda", arch=targets.gpu_arch()), tmp_path / "cuda.so")
    run = load_executable(path, "cuda")
    x = np.random.default_rng(2).integers(0, 256, (5, H, W, C), dtype=np.uint8)
    np.testing.assert_array_equal(run(x, tb.pack_params(g)), run_graph(g, x))
