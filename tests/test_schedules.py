"""Hand-written schedules (`lower.schedules`): bit-exact against the NumPy reference, and chosen by target features.

The VNNI conv tests run only where the host has avx512vnni; the selection tests do not depend on the host.
"""
from __future__ import annotations

import numpy as np
import pytest
import tvm

from lower import tvm_build as tb
from lower.reference import run_graph
from lower.schedules import x86_avx2, x86_vnni
from lower.targets import NO_SCHEDULES, make_target, select_schedules
from test_tvm_build import BATCHES, C, H, W, GraphMaker
from train.errors import DFQFError

HOST_VNNI = bool(tvm.target.codegen.llvm_cpu_has_features(["avx512vnni"], make_target("llvm")))
requires_vnni = pytest.mark.skipif(not HOST_VNNI, reason="host CPU lacks avx512vnni")


# -- selection: data in lower.targets, decided by the target's features ------------------------------------
def test_selection_follows_target_features():
    assert select_schedules("llvm", make_target("llvm", mcpu="znver4")) == "x86_vnni"
    assert select_schedules("llvm", make_target("llvm", mcpu="cascadelake")) == "x86_vnni"
    assert select_schedules("llvm", make_target("llvm", mcpu="haswell")) == "x86_avx2"
    assert select_schedules("llvm", make_target("llvm", mcpu="znver4"), NO_SCHEDULES) is None
    assert select_schedules("cuda", make_target("cuda")) is None


def test_selection_with_injected_features():
    target = make_target("llvm", mcpu="haswell")
    assert select_schedules("llvm", target, has_features=lambda f: set(f) <= {"avx512vnni"}) == "x86_vnni"
    with pytest.raises(DFQFError, match="needs avx512vnni"):
        select_schedules("llvm", target, "x86_vnni")
    with pytest.raises(DFQFError, match="no schedule set 'nope'"):
        select_schedules("llvm", target, "nope")


def test_supports_checks_exactness_bounds():
    m = GraphMaker(0, "uint8", 3)
    m.conv("c", "q", 16)
    node = m.nodes[-1]
    assert x86_vnni.supports(node, "uint8") and x86_vnni.supports(node, "int8")
    assert not x86_vnni.supports(node, "int32")
    node.attrs["groups"] = 3
    assert not x86_vnni.supports(node, "uint8")


# -- exactness of the scheduled conv ---------------------------------------------------------------------------
def _assert_exact(g, **compile_options) -> None:
    """The compiled graph equals the NumPy reference at every batch size, extreme pixels included."""
    ex = tb.compile_graph(g, "llvm", **compile_options)
    run = tb.IntegerExecutable(ex.mod, tvm.cpu())
    params = run.upload(tb.pack_params(g))
    rng = np.random.default_rng(7)
    for batch in BATCHES:
        x = rng.integers(0, 256, (batch, H, W, C), dtype=np.uint8)
        x[0, :2] = 0
        x[-1, -2:] = 255
        np.testing.assert_array_equal(run(x, params), run_graph(g, x))


def _assert_exact_vnni(g) -> None:
    _assert_exact(g, mcpu="znver4")


# input dtype and zero point, conv options: signed/unsigned inputs, strides, dilation, 1x1, int4 weights
CONV_CASES = pytest.mark.parametrize("input_dtype,zp,kw", [
    ("uint8", 17, dict(stride=(1, 1), padding=(1, 1))),
    ("uint8", 250, dict(stride=(2, 2), padding=(1, 1), bits=4)),
    ("int8", -9, dict(stride=(2, 1), padding=(0, 2), dilation=(2, 1))),
    ("int8", 100, dict(k=1, stride=(2, 2), padding=(0, 0), bits=4)),
])


def _conv_pair(input_dtype, zp, kw, second_out: int):
    """conv (20 outputs: a padded last channel block) -> requantize -> conv (20 inputs, `second_out` outputs)."""
    m = GraphMaker(2, input_dtype, zp)
    x = m.requantize("r1", [m.conv("c1", "q", 20, **kw)], relu=True)
    m.conv("c2", x, second_out, bits=kw.get("bits", 8))
    return m.graph()


@requires_vnni
@CONV_CASES
def test_vnni_conv_matches_reference(input_dtype, zp, kw):
    g = _conv_pair(input_dtype, zp, kw, 16)
    assert "vnni" in tb.build_relax(g, "x86_vnni").script()
    _assert_exact_vnni(g)


@requires_vnni
def test_vnni_conv_with_grouped_fallback_and_residual():
    m = GraphMaker(3, "uint8", 5)
    a = m.conv("c1", "q", 8)
    a = m.requantize("r1", [a])
    b = m.conv("c2", a, 8, groups=2)  # grouped: default loops
    b2 = m.conv("c3", a, 8, k=1, padding=(0, 0))
    m.requantize("y", [b, "r1"], relu=True)
    m.requantize("y2", [b2, "y"])
    _assert_exact_vnni(m.graph())


def _fusion_graph(input_dtype: str, input_zp: int, dtype: str, per_channel: bool, stride=(1, 1), c3_bits: int = 8):
    """Convs whose requantize can be fused into the kernel (c0; c1 with a residual; c3, with c2's int32
    accumulator as its residual) and cannot (c2, the other conv of that requantize; c4 and c5, residuals of
    20 channels)."""
    m = GraphMaker(5, input_dtype, input_zp)
    a = m.requantize("a", [m.conv("c0", "q", 16, stride=stride)], zero_point=9)  # 16 channels: residual-capable
    b = m.conv("c1", a, 16)
    m.requantize("y", [b, a], dtype=dtype, zero_point=-5 if dtype == "int8" else 4, per_channel=per_channel)
    z = m.requantize("z", [m.conv("c2", "y", 16, k=1, padding=(0, 0)), m.conv("c3", "y", 16, bits=c3_bits)])
    m.requantize("w", [m.conv("c4", z, 20), m.conv("c5", z, 20)])  # residual of 20 channels: not fusable
    return m.graph()


def _assert_fused_kernels(g, schedules: str, suffix: str) -> None:
    kernels = {gv.name_hint.removesuffix(suffix): [p.name for p in f.params]
               for gv, f in tb.build_relax(g, schedules).functions_items() if gv.name_hint.endswith(suffix)}
    assert set(kernels) == {"c0", "c1", "c2", "c3", "c4"}  # c5's kernel is c4's (BlockBuilder dedups it)
    assert {name for name, params in kernels.items() if "multiplier" in params} == {"c0", "c1", "c3"}


@requires_vnni
@pytest.mark.parametrize("dtype,per_channel", [("uint8", True), ("int8", False)])
def test_conv_requantize_fused_into_one_kernel(dtype, per_channel):
    """A conv whose only consumer is a requantize runs as one kernel with the requantize as its epilogue
    (residual terms included, any zero points); pairs the epilogue cannot take fall back to two ops."""
    g = _fusion_graph("uint8", 7, dtype, per_channel)
    _assert_fused_kernels(g, "x86_vnni", "_conv2d_vnni")
    _assert_exact_vnni(g)


def test_register_tile_fits_the_accumulators():
    assert x86_vnni.register_tile(32, 1) == (16, 1)
    assert x86_vnni.register_tile(16, 2) == (8, 2)
    assert x86_vnni.register_tile(8, 4) == (4, 4)
    assert x86_vnni.register_tile(7, 1) == (7, 1)
    assert all(zt * obt <= x86_vnni.MAX_ACC for zt, obt in (x86_vnni.register_tile(w, o) for w in range(1, 40)
                                                            for o in range(1, 9)))


def test_default_loops_match_reference():
    """The NHWC-internal lowering with TVM's default loops (hosts without a schedule set), every op."""
    from test_tvm_build import all_ops_graph, assert_exact

    g = all_ops_graph(1)
    assert_exact(g, tb.compile_graph(g, "llvm", schedules=NO_SCHEDULES))


# -- the AVX2 fallback (x86_avx2): compiled for haswell, so no AVX-512 instruction is involved ----------------
HOST_AVX2 = bool(tvm.target.codegen.llvm_cpu_has_features(list(x86_avx2.AVX2_FEATURES), make_target("llvm")))
requires_avx2 = pytest.mark.skipif(not HOST_AVX2, reason="host CPU lacks avx2")
AVX2_CPU = "haswell"


def test_selection_falls_back_to_avx2():
    target = make_target("llvm", mcpu=AVX2_CPU)
    assert select_schedules("llvm", target, has_features=lambda f: set(f) <= {"avx2"}) == "x86_avx2"
    assert select_schedules("llvm", target, has_features=lambda f: not f) is None
    assert select_schedules("llvm", target, "x86_avx2") == "x86_avx2"
    with pytest.raises(DFQFError, match="needs avx2"):
        select_schedules("llvm", make_target("llvm", mcpu="nehalem"), "x86_avx2")


def _assert_exact_avx2(g) -> None:
    _assert_exact(g, schedules="x86_avx2", mcpu=AVX2_CPU)


@requires_avx2
@CONV_CASES
def test_avx2_conv_matches_reference(input_dtype, zp, kw):
    g = _conv_pair(input_dtype, zp, kw, 12)  # 12 outputs: a padded 8-channel block in the unfused kernel
    assert "conv2d_avx2" in tb.build_relax(g, "x86_avx2").script()
    _assert_exact_avx2(g)


@requires_avx2
@pytest.mark.parametrize("dtype,per_channel", [("uint8", True), ("int8", False)])
def test_avx2_conv_requantize_fused(dtype, per_channel):
    """As test_conv_requantize_fused_into_one_kernel, with 8-channel blocks, int8 inputs, a strided first
    conv and an int4 conv: residuals of 20 channels (not a multiple of 8) fall back to two ops."""
    g = _fusion_graph("int8", -7, dtype, per_channel, stride=(2, 2), c3_bits=4)
    _assert_fused_kernels(g, "x86_avx2", "_conv2d_avx2")
    _assert_exact_avx2(g)


@requires_avx2
def test_avx2_tiny_network_matches_reference(tiny_students):
    from lower.integerize import integerize

    student, info = tiny_students(8, 8)
    g = integerize(student, info.mean, info.std, info.input_size)
    assert any(gv.name_hint.endswith("_conv2d_avx2") for gv, _ in tb.build_relax(g, "x86_avx2").functions_items())
    ex = tb.compile_graph(g, "llvm", schedules="x86_avx2", mcpu=AVX2_CPU)
    c, h, w = info.input_size
    x = np.random.default_rng(3).integers(0, 256, (3, h, w, c), dtype=np.uint8)
    np.testing.assert_array_equal(tb.run_executable(ex, x, tb.pack_params(g)), run_graph(g, x))


def test_avx2_register_tile_fits_the_accumulators():
    assert x86_avx2.register_tile(32, 2) == (8, 2)
    assert x86_avx2.register_tile(8, 8) == (4, 4)  # the squarest of the 16-accumulator tiles
    assert x86_avx2.register_tile(7, 1) == (7, 1)
    assert all(zt * obt <= x86_avx2.MAX_ACC for zt, obt in (x86_avx2.register_tile(w, o) for w in range(1, 40)
                                                            for o in range(1, 9)))
