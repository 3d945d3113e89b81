"""The AMX schedule set (`lower.schedules.x86_amx`): chosen on AMX targets, bit-exact against the NumPy reference,
and the process-level AMX permission (`core.isa`).

Kernels run only where the host has amx-int8 and Linux grants the tile state; selection and planning tests do
not depend on the host.
"""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from test_schedules import CONV_CASES, _conv_pair, _fusion_graph, _run_kernel, assert_tiny_network_exact

from core import isa
from core.errors import DFQFError
from lower import tvm_build as tb
from lower.schedules import SCHEDULE_SETS, x86_amx
from lower.schedules.x86_conv import ConvShape
from lower.targets import host_features, make_target, select_schedules
from toolkit import assert_exact

AMX = SCHEDULE_SETS["x86_amx"]
AMX_CPU = "sapphirerapids"
HOST_AMX = "amx-int8" in host_features() and isa.amx_granted()
requires_amx = pytest.mark.skipif(not HOST_AMX, reason="host CPU lacks amx-int8 (or Linux refused the tile state)")


def test_amx_first_on_amx_targets():
    assert select_schedules("llvm", make_target("llvm", mcpu=AMX_CPU)).name == "x86_amx"
    assert select_schedules("llvm", make_target("llvm", mcpu="znver4")).name == "x86_vnni"
    with pytest.raises(DFQFError, match="needs amx-int8"):
        select_schedules("llvm", make_target("llvm", mcpu="znver4"), "x86_amx")


def test_k_chunks_tile_the_reduction_exactly():
    assert x86_amx.k_chunk(192) == 64 and x86_amx.k_chunk(48) == 48 and x86_amx.k_chunk(96) == 48
    assert x86_amx.k_chunk(12) == 12 and x86_amx.k_chunk(60) == 60
    assert all(k % x86_amx.k_chunk(k) == 0 and x86_amx.k_chunk(k) <= 64 for k in range(4, 2000, 4))
    stem = ConvShape((32, 32), (1, 1), 4, "uint8", 1, (3, 3), (1, 1), (1, 1))  # 3 channels padded to 4
    assert not x86_amx.runs_on_amx(stem)  # 12 bytes per tile: the VNNI kernel takes it
    assert not x86_amx.runs_on_amx(ConvShape((9, 9), (2, 2), 64, "uint8", 1, (3, 3), (1, 1), (2, 2)))
    assert x86_amx.runs_on_amx(ConvShape((8, 8), (1, 1), 16, "uint8", 1, (3, 3), (1, 1), (1, 1)))
    assert not x86_amx.runs_on_amx(ConvShape((1, 1), (0, 0), 1280, "uint8", 63, (1, 1), (1, 1), (1, 1)))  # dense


def test_tile_configuration_matches_the_blocking():
    cfg = x86_amx._config(16, 2, 2, 48)
    assert cfg[0] == 1 and len(cfg) == 64
    colsb = [cfg[16 + 2 * t] | cfg[17 + 2 * t] << 8 for t in range(8)]
    assert colsb == [64] * 4 + [48] * 2 + [64] * 2 and cfg[48:56] == [16] * 6 + [12] * 2
    assert x86_amx._blocking(1, 61) == (16, 3, 1) and x86_amx._blocking(4, 8) == (8, 1, 2)


def test_refused_tile_state_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(isa, "_request", lambda: "Linux refused the AMX tile state (arch_prctl: Invalid argument)")
    with pytest.raises(DFQFError, match="refused the AMX tile state.*x86_vnni"):
        isa.request_amx()


def _reference(x: np.ndarray, zp_u: int, w: np.ndarray, shape: ConvShape) -> np.ndarray:
    """int64 sum(u * w) of the kernel: u = x (+128 for int8) padded with zp_u, w packed [O/16, kh, kw, C/4, 16, 4]."""
    (kh, kw), (sh, sw), (ph, pw) = shape.kernel, shape.stride, shape.padding
    u = x.astype(np.int64) + (128 if x.dtype == np.int8 else 0)
    u = np.pad(u, [(0, 0), (ph, ph), (pw, pw), (0, 0)], constant_values=zp_u)
    wk = w.transpose(1, 2, 3, 5, 0, 4).reshape(kh, kw, shape.cin, -1).astype(np.int64)  # [kh, kw, C, O]
    oh, ow = shape.output_hw
    out = np.zeros((x.shape[0], oh, ow, wk.shape[-1]), np.int64)
    for r in range(kh):
        for s in range(kw):
            out += u[:, r:r + sh * (oh - 1) + 1:sh, s:s + sw * (ow - 1) + 1:sw] @ wk[r, s]
    return out


@requires_amx
@pytest.mark.parametrize("in_hw,padding,cin,dtype,blocks,kernel,stride", [
    ((8, 8), (1, 1), 64, "uint8", 4, (3, 3), (1, 1)),  # flat pixels across rows, 2 x 2 blocking, last tile early
    ((32, 32), (1, 1), 16, "uint8", 1, (3, 3), (1, 1)),  # 48-byte K, 3 x 1 blocking
    ((16, 16), (1, 1), 32, "int8", 2, (3, 3), (2, 2)),  # strided: one output row per sequence; int8 -> uint8
    ((7, 7), (0, 0), 256, "uint8", 3, (1, 1), (1, 1)),  # read in place, odd channel blocks, 4 K chunks
    ((9, 5), (0, 0), 32, "int8", 2, (1, 1), (2, 2)),  # 3-pixel rows: 3-row tiles
    ((5, 5), (2, 1), 20, "uint8", 1, (3, 5), (1, 2)),  # 5 x 5 window of 100-byte runs (20-byte chunks)
])
@pytest.mark.parametrize("weights_outer", [False, True])
def test_amx_kernel_matches_reference(in_hw, padding, cin, dtype, blocks, kernel, stride, weights_outer, monkeypatch):
    """Both loop orders: images outermost, or (weights beyond WEIGHTS_OUTER_BYTES) channel blocks outermost."""
    monkeypatch.setattr(x86_amx, "WEIGHTS_OUTER_BYTES", 0 if weights_outer else 1 << 30)
    rng = np.random.default_rng(sum(in_hw) + cin)
    shape = ConvShape(in_hw, padding, cin, dtype, blocks, kernel, stride, (1, 1))
    func = x86_amx.conv2d_nhwc_amx(tvm.tirx.Var("n", "int64"), shape)
    for batch in (1, x86_amx.IMAGES_PER_TASK + 1):  # one task; two tasks, the second with one image
        lo, hi = (-128, 128) if dtype == "int8" else (0, 256)
        x = rng.integers(lo, hi, (batch, *in_hw, cin)).astype(dtype)
        w = rng.integers(-128, 128, (blocks, *kernel, cin // 4, 16, 4)).astype(np.int8)
        got = _run_kernel(func, make_target("llvm", mcpu=AMX_CPU), x, np.array([201], np.int32), w)
        np.testing.assert_array_equal(got, _reference(x, 201, w, shape))


def _assert_exact_amx(g) -> None:
    assert_exact(g, mcpu=AMX_CPU)


@requires_amx
@CONV_CASES
def test_amx_conv_matches_reference(input_dtype, zp, kw):
    """conv -> requantize -> conv (20 channels in): the 3-channel first conv falls back to the VNNI kernel."""
    g = _conv_pair(input_dtype, zp, kw, 16)
    script = tb.build_relax(g, AMX).script()
    assert "c1_conv2d_vnni" in script and "c2_conv2d_amx" in script
    _assert_exact_amx(g)


@requires_amx
@pytest.mark.parametrize("dtype,per_channel", [("uint8", True), ("int8", False)])
def test_amx_conv_requantize_fused(dtype, per_channel):
    """The requantize epilogue (residual terms, zero points, per-channel or per-tensor) on AMX kernels."""
    g = _fusion_graph("uint8", 7, dtype, per_channel, stride=(2, 2), c3_bits=4)
    kernels = {gv.name_hint: [p.name for p in f.params] for gv, f in tb.build_relax(g, AMX).functions_items()}
    amx = {name.removesuffix("_conv2d_amx") for name in kernels if name.endswith("_conv2d_amx")}
    assert amx == {"c1", "c2", "c3", "c4"} and "c0_conv2d_vnni" in kernels  # c0 reads the 3-channel input
    assert {k for k in amx if "multiplier" in kernels[f"{k}_conv2d_amx"]} == {"c1", "c3"}
    _assert_exact_amx(g)


@requires_amx
def test_amx_tiny_network_matches_reference(tiny_students):
    assert_tiny_network_exact(tiny_students, AMX, AMX_CPU, batch=x86_amx.IMAGES_PER_TASK + 5)


@requires_amx
def test_amx_peak_loop_computes_its_sums():
    """`benchmarks.vnni_peak`'s AMX loop: checks its own sums (1 x 1 over 64 bytes x iters) and reports a rate."""
    from benchmarks.vnni_peak import measure_amx_peak

    peak = measure_amx_peak(reps=3, iters=200)
    assert peak is not None and peak["amx_gmacs"] >= peak["amx_gmacs_median"] > 0
