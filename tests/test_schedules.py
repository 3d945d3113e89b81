"""Hand-written schedules (`lower.schedules`): bit-exact against the NumPy reference, and chosen by target features.

The VNNI conv tests run only where the host has avx512vnni; the selection tests do not depend on the host.
"""
from __future__ import annotations

import numpy as np
import pytest
import tvm

from core.errors import DFQFError
from lower import tvm_build as tb
from lower.reference import run_graph
from lower.schedules import SCHEDULE_SETS, x86_avx2, x86_vnni
from lower.schedules.x86_conv import ConvShape
from lower.targets import NO_SCHEDULES, make_target, select_schedules
from runtime.executable import run_executable
from toolkit import GraphMaker, all_ops_graph, assert_exact

VNNI, AVX2 = SCHEDULE_SETS["x86_vnni"], SCHEDULE_SETS["x86_avx2"]


def selected(*args, **kwargs) -> str | None:
    chosen = select_schedules(*args, **kwargs)
    return None if chosen is None else chosen.name

HOST_VNNI = bool(tvm.target.codegen.llvm_cpu_has_features(["avx512vnni"], make_target("llvm")))
requires_vnni = pytest.mark.skipif(not HOST_VNNI, reason="host CPU lacks avx512vnni")


# -- selection: data in lower.targets, decided by the target's features ------------------------------------
def test_selection_follows_target_features():
    assert selected("llvm", make_target("llvm", mcpu="znver4")) == "x86_vnni"
    assert selected("llvm", make_target("llvm", mcpu="cascadelake")) == "x86_vnni"
    assert selected("llvm", make_target("llvm", mcpu="haswell")) == "x86_avx2"
    assert selected("llvm", make_target("llvm", mcpu="znver4"), NO_SCHEDULES) is None
    assert selected("cuda", make_target("cuda")) is None


def test_selection_with_injected_features():
    target = make_target("llvm", mcpu="haswell")
    assert selected("llvm", target, has_features=lambda f: set(f) <= {"avx512vnni"}) == "x86_vnni"
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
def _assert_exact_vnni(g) -> None:
    assert_exact(g, mcpu="znver4")


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
    assert "vnni" in tb.build_relax(g, VNNI).script()
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


def _assert_fused_kernels(g, schedules, suffix: str) -> None:
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
    _assert_fused_kernels(g, VNNI, "_conv2d_vnni")
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
    g = all_ops_graph(1)
    assert_exact(g, tb.compile_graph(g, "llvm", schedules=NO_SCHEDULES))


# -- the AVX2 fallback (x86_avx2): compiled for haswell, so no AVX-512 instruction is involved ----------------
HOST_AVX2 = bool(tvm.target.codegen.llvm_cpu_has_features(list(x86_avx2.AVX2_FEATURES), make_target("llvm")))
requires_avx2 = pytest.mark.skipif(not HOST_AVX2, reason="host CPU lacks avx2")
AVX2_CPU = "haswell"


def test_selection_falls_back_to_avx2():
    target = make_target("llvm", mcpu=AVX2_CPU)
    assert selected("llvm", target, has_features=lambda f: set(f) <= {"avx2"}) == "x86_avx2"
    assert selected("llvm", target, has_features=lambda f: not f) is None
    assert selected("llvm", target, "x86_avx2") == "x86_avx2"
    with pytest.raises(DFQFError, match="needs avx2"):
        select_schedules("llvm", make_target("llvm", mcpu="nehalem"), "x86_avx2")


def _assert_exact_avx2(g) -> None:
    assert_exact(g, schedules="x86_avx2", mcpu=AVX2_CPU)


@requires_avx2
@CONV_CASES
def test_avx2_conv_matches_reference(input_dtype, zp, kw):
    g = _conv_pair(input_dtype, zp, kw, 12)  # 12 outputs: a padded 8-channel block in the unfused kernel
    assert "conv2d_avx2" in tb.build_relax(g, AVX2).script()
    _assert_exact_avx2(g)


@requires_avx2
@pytest.mark.parametrize("dtype,per_channel", [("uint8", True), ("int8", False)])
def test_avx2_conv_requantize_fused(dtype, per_channel):
    """As test_conv_requantize_fused_into_one_kernel, with 8-channel blocks, int8 inputs, a strided first
    conv and an int4 conv: residuals of 20 channels (not a multiple of 8) fall back to two ops."""
    g = _fusion_graph("int8", -7, dtype, per_channel, stride=(2, 2), c3_bits=4)
    _assert_fused_kernels(g, AVX2, "_conv2d_avx2")
    _assert_exact_avx2(g)


def assert_tiny_network_exact(tiny_students, schedules, mcpu: str, batch: int = 3) -> None:
    """The calibrated tiny W8A8 student, compiled with schedule set `schedules` for `mcpu`: it uses the set's
    conv kernels and equals the reference bit for bit at `batch`."""
    from lower.integerize import integerize

    student, info = tiny_students(8, 8)
    g = integerize(student, info.mean, info.std, info.input_size)
    suffix = "_" + schedules.conv2d[0].suffix
    assert any(gv.name_hint.endswith(suffix) for gv, _ in tb.build_relax(g, schedules).functions_items())
    ex = tb.compile_graph(g, "llvm", schedules=schedules.name, mcpu=mcpu)
    c, h, w = info.input_size
    x = np.random.default_rng(3).integers(0, 256, (batch, h, w, c), dtype=np.uint8)
    np.testing.assert_array_equal(run_executable(ex, x, tb.pack_params(g)), run_graph(g, x))


@requires_avx2
def test_avx2_tiny_network_matches_reference(tiny_students):
    assert_tiny_network_exact(tiny_students, AVX2, AVX2_CPU)


def test_avx2_register_tile_fits_the_accumulators():
    assert x86_avx2.register_tile(32, 2) == (8, 2)
    assert x86_avx2.register_tile(8, 8) == (4, 4)  # the squarest of the 16-accumulator tiles
    assert x86_avx2.register_tile(7, 1) == (7, 1)
    assert all(zt * obt <= x86_avx2.MAX_ACC for zt, obt in (x86_avx2.register_tile(w, o) for w in range(1, 40)
                                                            for o in range(1, 9)))


# -- the padding stage inside the kernels (no pad kernel; rows split across parallel tasks) --------------------
def _run_kernel(func, target, *arrays) -> np.ndarray:
    """Compile a kernel PrimFunc and run it on `arrays`; returns its last (output) argument."""
    mod = tvm.compile(tvm.IRModule({"main": func}), target=target).mod
    out_buf = func.params[-1]
    shape = [arrays[0].shape[0] if isinstance(d, tvm.tirx.Var) else int(d) for d in out_buf.shape]
    args = [tvm.runtime.tensor(a, tvm.cpu()) for a in arrays] + [tvm.runtime.tensor(np.zeros(shape, out_buf.dtype))]
    mod["main"](*args)
    return args[-1].numpy()


def _padded_conv(d: np.ndarray, w: np.ndarray, padding, stride, dilation, fill: int) -> np.ndarray:
    """int64 NHWC conv of d [n, H, W, C] padded with `fill` by w [O, C, kh, kw] (the NumPy reference)."""
    (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
    dp = np.pad(d.astype(np.int64), [(0, 0), (ph, ph), (pw, pw), (0, 0)], constant_values=fill)
    o, _, kh, kw = w.shape
    oh = (dp.shape[1] - (kh - 1) * dh - 1) // sh + 1
    ow = (dp.shape[2] - (kw - 1) * dw - 1) // sw + 1
    out = np.zeros((d.shape[0], oh, ow, o), np.int64)
    for r in range(kh):
        for s in range(kw):
            patch = dp[:, r * dh: r * dh + (oh - 1) * sh + 1: sh, s * dw: s * dw + (ow - 1) * sw + 1: sw]
            out += patch @ w[:, :, r, s].T.astype(np.int64)
    return out


@pytest.mark.parametrize("family", ["vnni", "avx2"])
@pytest.mark.parametrize("in_dtype,zp,padding,stride,dilation", [
    ("uint8", 200, (1, 1), (1, 1), (1, 1)),  # OH 20: 4 parallel tasks of 5 rows
    ("int8", -3, (2, 1), (2, 1), (2, 1)),  # OH 10: 2 tasks of 5 rows; rows and columns padded differently
    ("uint8", 0, (0, 0), (1, 1), (1, 1)),  # no padding: uint8 inputs are read in place by VNNI
])
def test_kernel_pads_its_input_itself(family, in_dtype, zp, padding, stride, dilation):
    """The kernels read the unpadded activation: the padded rows each parallel task needs are formed inside
    the kernel, with the zero point (VNNI: u = x (+128), padded with zp_u) or zero (AVX2: d = x - zp)."""
    if not (HOST_VNNI if family == "vnni" else HOST_AVX2):
        pytest.skip(f"host CPU lacks the {family} instructions")
    rng = np.random.default_rng(11)
    n, (h, w), cin, o, (kh, kw) = 2, (20, 13), 8, 32, (3, 3)
    lo, hi = (0, 256) if in_dtype == "uint8" else (-128, 128)
    x = rng.integers(lo, hi, (n, h, w, cin)).astype(in_dtype)
    wt = rng.integers(-128, 128, (o, cin, kh, kw)).astype(np.int8)
    batch = tvm.tirx.Var("n", "int64")
    shape = ConvShape((h, w), padding, cin, in_dtype, o // (16 if family == "vnni" else 8), (kh, kw), stride, dilation)
    if family == "vnni":
        zp_u = zp + (128 if in_dtype == "int8" else 0)
        func = x86_vnni.conv2d_nhwc_u8s8(batch, shape)
        packed = wt.reshape(o // 16, 16, cin // 4, 4, kh, kw).transpose(0, 4, 5, 2, 1, 3)
        u = x.astype(np.int64) + (128 if in_dtype == "int8" else 0)
        expect = _padded_conv(u, wt, padding, stride, dilation, zp_u)
        got = _run_kernel(func, make_target("llvm", mcpu="znver4"), x, np.array([zp_u], np.int32),
                          np.ascontiguousarray(packed))
    else:
        func = x86_avx2.conv2d_nhwc_s16(batch, shape)
        packed = wt.astype(np.int16).reshape(o // 8, 8, cin // 4, 2, 2, kh, kw).transpose(0, 5, 6, 2, 3, 1, 4)
        expect = _padded_conv(x.astype(np.int64) - zp, wt, padding, stride, dilation, 0)
        got = _run_kernel(func, make_target("llvm", mcpu=AVX2_CPU), x, np.array([zp], np.int32),
                          np.ascontiguousarray(packed))
    has_pad_stage = padding != (0, 0) or in_dtype != "uint8" or family == "avx2"
    assert ('T.sblock("pad")' in func.script()) == has_pad_stage
    np.testing.assert_array_equal(got, expect)



# -- depthwise convs and the dense layer (MobileNet, every classifier) ----------------------------------------
@pytest.mark.parametrize("schedules,mcpu,host", [("x86_vnni", "znver4", "vnni"), ("x86_avx2", AVX2_CPU, "avx2")])
@pytest.mark.parametrize("input_dtype,zp,stride,channels,bits", [
    ("uint8", 7, (1, 1), 24, 8),  # 24 channels: a padded lane block
    ("int8", -5, (2, 2), 16, 8),
    ("uint8", 200, (2, 1), 20, 4),  # int4 weights, an odd stride
])
def test_depthwise_conv_matches_reference(schedules, mcpu, host, input_dtype, zp, stride, channels, bits):
    """3x3 depthwise convs on their own kernel: requantize fused (ReLU6-like clamp), residual, and alone."""
    if not (HOST_VNNI if host == "vnni" else HOST_AVX2):
        pytest.skip(f"host CPU lacks {host}")
    m = GraphMaker(4, input_dtype, zp)
    a = m.requantize("a", [m.conv("c0", "q", channels, k=1, padding=(0, 0))], relu=True)
    d = m.conv("dw", a, channels, stride=stride, groups=channels, bits=bits)
    y = m.requantize("y", [d], relu=True)
    m.requantize("z", [m.conv("dw2", y, channels, groups=channels), y])  # a residual term
    m.conv("dw3", "z", channels, k=3, padding=(0, 0), groups=channels)  # unfused: the int32 accumulator out
    g = m.graph()
    kernels = [gv.name_hint for gv, _ in tb.build_relax(g, SCHEDULE_SETS[schedules]).functions_items()]
    assert {k.split("_depthwise")[0] for k in kernels if "_depthwise" in k} == {"dw", "dw2", "dw3"}
    assert_exact(g, schedules=schedules, mcpu=mcpu)


@pytest.mark.parametrize("schedules,mcpu,host", [("x86_vnni", "znver4", "vnni"), ("x86_avx2", AVX2_CPU, "avx2")])
@pytest.mark.parametrize("k,stride,padding,dilation", [
    (2, (1, 1), (0, 0), (1, 1)),  # an even filter width: no zero partner tap
    (5, (1, 1), (2, 2), (1, 1)),  # odd: the last pair's partner is a zero weight
    (3, (1, 1), (2, 2), (2, 2)),  # dilated: pairs of columns 2 apart
    (3, (3, 3), (1, 1), (1, 1)),  # stride 3: every pair column formed (2 dw is no multiple of 3)
    (7, (2, 2), (3, 3), (1, 1)),  # stride 2: only the even pair columns
    (3, (2, 2), (2, 2), (2, 2)),  # stride 2, dilation 2: pairs 2 apart, even columns
])
def test_depthwise_tap_pairs_match_reference(schedules, mcpu, host, k, stride, padding, dilation):
    """The int16 pair form of the depthwise kernel for every way its taps pair up (batch 1 and 3)."""
    if not (HOST_VNNI if host == "vnni" else HOST_AVX2):
        pytest.skip(f"host CPU lacks {host}")
    m = GraphMaker(5, "int8", -3)
    a = m.requantize("a", [m.conv("c0", "q", 20, k=1, padding=(0, 0))], dtype="int8", zero_point=-9)
    d = m.conv("dw", a, 20, k=k, stride=stride, padding=padding, dilation=dilation, groups=20)
    m.requantize("y", [d], relu=True)
    g = m.graph()
    kernels = [gv.name_hint for gv, _ in tb.build_relax(g, SCHEDULE_SETS[schedules]).functions_items()]
    assert any(k.startswith("dw_depthwise") for k in kernels), kernels
    assert_exact(g, schedules=schedules, mcpu=mcpu)


@pytest.mark.parametrize("schedules,mcpu,host", [("x86_vnni", "znver4", "vnni"), ("x86_avx2", AVX2_CPU, "avx2")])
@pytest.mark.parametrize("bits", [8, 4])
def test_dense_runs_on_the_conv_kernel(schedules, mcpu, host, bits):
    if not (HOST_VNNI if host == "vnni" else HOST_AVX2):
        pytest.skip(f"host CPU lacks {host}")
    m = GraphMaker(6)
    m.dense("fc", m.add("reshape", "fl", ["q"], {"shape": [3 * 8 * 8]}), 37, bits=bits)  # K = 192, O = 37
    g = m.graph()
    suffix = "_conv2d_vnni" if host == "vnni" else "_conv2d_avx2"
    assert any(gv.name_hint == "fc" + suffix for gv, _ in tb.build_relax(g, SCHEDULE_SETS[schedules]).functions_items())
    assert_exact(g, schedules=schedules, mcpu=mcpu)
