"""The int32-tail requantize epilogue of the VNNI, AVX2 and depthwise conv kernels (`lower.schedules.x86_requant`):
chosen exactly where every shift is >= 32 and at most one residual term is added, bit-exact against the NumPy
reference next to the int64 epilogue of the rest."""
from __future__ import annotations

import numpy as np
import pytest
import tvm

from lower import tvm_build as tb
from lower.schedules import SCHEDULE_SETS
from lower.targets import make_target
from toolkit import GraphMaker, assert_exact

HOST = make_target("llvm")
SETS = [  # schedule set, an LLVM CPU with its features, the host feature it needs
    pytest.param("x86_vnni", "znver4", marks=pytest.mark.skipif(
        not tvm.target.codegen.llvm_cpu_has_features(["avx512vnni"], HOST), reason="host CPU lacks avx512vnni")),
    pytest.param("x86_avx2", "haswell", marks=pytest.mark.skipif(
        not tvm.target.codegen.llvm_cpu_has_features(["avx2"], HOST), reason="host CPU lacks avx2")),
]


def _graph(dtype: str, zero_point: int, relu: bool, shifts: tuple[int, int], residual_dtype: str = "uint8",
           size: int | None = None):
    """A fused plain epilogue (c0), a depthwise one (dw), one with a residual term (c1 + a) and
    one with two residual terms (c2 + a + b: the int64 form whatever the shifts)."""
    pixels = None if size is None else np.random.default_rng(1).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    m = GraphMaker(6, "uint8", 7, pixels=pixels)
    a = m.requantize("a", [m.conv("c0", "q", 16)], dtype=residual_dtype, zero_point=-4 if residual_dtype == "int8"
                     else 9, shifts=shifts)
    d = m.requantize("d", [m.conv("dw", a, 16, groups=16)], relu=True, zero_point=6, shifts=shifts)
    b = m.requantize("b", [m.conv("c1", d, 16), a], dtype=dtype, zero_point=zero_point, relu=relu, shifts=shifts)
    m.requantize("y", [m.conv("c2", b, 16, k=1, padding=(0, 0)), a, b], shifts=shifts)
    return m.graph()


def _hi32(g, schedules: str = "x86_vnni") -> dict[str, bool]:
    """Conv name -> whether its fused epilogue is the int32-tail form."""
    kernels: dict = {}
    tb.build_relax(g, SCHEDULE_SETS[schedules], kernels=kernels)
    return {node: r.epilogue.hi32 for r in kernels.values() if r.epilogue is not None for node in r.nodes}


@pytest.mark.parametrize("schedules", ["x86_vnni", "x86_avx2"])
@pytest.mark.parametrize("shifts,expected", [((32, 45), True), ((30, 32), False)])
def test_the_epilogue_form_follows_the_shifts(schedules, shifts, expected):
    """hi32 for every fused epilogue with at most one residual exactly when no shift is below 32 (seeded:
    each 16-channel layer drawn from 30-32 has a shift below 32)."""
    g = _graph("uint8", 3, False, shifts)
    shift_min = {n.inputs[0]: int(n.params["shift"].min()) for n in g.nodes if n.op == "requantize"}
    forms = _hi32(g, schedules)
    assert set(forms) == {"c0", "dw", "c1", "c2"}
    assert not forms["c2"]  # two residual terms
    for conv in ("c0", "dw", "c1"):
        assert forms[conv] == (shift_min[conv] >= 32) == expected


OUTPUTS = {  # output dtype, zero point, ReLU (qmin = zp), residual dtype
    "u8": ("uint8", 3, False, "uint8"), "u8_relu": ("uint8", 11, True, "int8"),
    "s8": ("int8", -5, False, "int8"), "s8_relu": ("int8", 2, True, "uint8")}
CASES = [  # shifts of exactly 32 (a zero int32 shift) with every output form; 40-45 and mixed 29-34 with two each
    *(((32, 32), o) for o in OUTPUTS), ((40, 45), "u8_relu"), ((40, 45), "s8"), ((29, 34), "u8"), ((29, 34), "s8_relu")]


@pytest.mark.parametrize("schedules,mcpu", SETS)
@pytest.mark.parametrize("shifts,dtype,zero_point,relu,residual_dtype", [(s, *OUTPUTS[o]) for s, o in CASES])
def test_int32_tail_epilogue_matches_reference(schedules, mcpu, dtype, zero_point, relu, residual_dtype, shifts):
    g = _graph(dtype, zero_point, relu, shifts, residual_dtype)
    forms = _hi32(g, schedules)
    if shifts[0] >= 32:
        assert forms["c0"] and forms["dw"] and forms["c1"]
    assert_exact(g, schedules=schedules, mcpu=mcpu)


@pytest.mark.parametrize("schedules,mcpu", SETS)
def test_int32_tail_epilogue_over_parallel_row_blocks(schedules, mcpu):
    """20 output rows: several parallel row blocks fused with the symbolic (int64) batch, whose cast binding
    blockize could not divide when the epilogue was tensorized after the fuse."""
    g = _graph("uint8", 3, True, (33, 40), size=20)
    assert all(_hi32(g, schedules)[conv] for conv in ("c0", "dw", "c1"))
    assert_exact(g, schedules=schedules, mcpu=mcpu)
