"""Targets from the host's real features, not its CPU name (issue 13): the llvm target's mattr, the
features an artifact needs (manifest), and a clear refusal to run an artifact the host cannot execute."""
from __future__ import annotations

import json

import pytest

from core.errors import DFQFError
from lower.compile import CompileOptions, compile_student
from lower.targets import ISA_FEATURES, host_features, host_mattr, make_target, required_features, select_schedules
from runtime import load
from train.quant.convert import QuantConfig
from train.student import save_student

XEON_VM = "flags\t\t: fpu sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 avx512f avx512dq avx512cd avx512bw avx512vl " \
          "avx512ifma avx512vbmi avx512_vbmi2 avx512_vnni avx512_bitalg avx512_vpopcntdq avx512_bf16 avx512_fp16 " \
          "avx_vnni amx_bf16 amx_tile amx_int8\n"


def test_host_features_come_from_the_cpu_flags() -> None:
    have = host_features(XEON_VM)
    assert {"amx-int8", "amx-tile", "avx512vnni", "avx512fp16"} <= have and "sse4a" not in have
    assert host_features("processor : 0\n") == host_features("processor : 0\n")  # no flags line: LLVM's view
    assert set(ISA_FEATURES.values()) >= host_features()


def test_a_vm_that_names_its_cpu_wrongly_still_gets_its_features() -> None:
    """A Sapphire Rapids VM reports 'rocketlake' (no AMX in LLVM's table): the target adds what the flags show."""
    mattr = host_mattr("rocketlake", host_features(XEON_VM))
    assert {"+amx-int8", "+amx-tile", "+avx512fp16", "+avxvnni"} <= set(mattr)
    target = make_target("llvm", mcpu="rocketlake", mattr=mattr)
    assert {"amx-int8", "avx512vnni"} <= set(required_features(target))
    hidden = host_mattr("znver4", frozenset({"avx", "avx2", "fma", "f16c", "bmi", "bmi2", "sse4.1", "sse4.2"}))
    assert "-avx512f" in hidden  # a name that promises AVX-512 the host hides: taken away, never a SIGILL
    assert "avx512f" not in required_features(make_target("llvm", mcpu="znver4", mattr=hidden))
    assert select_schedules("llvm", make_target("llvm", mcpu="znver4", mattr=hidden)).name == "x86_avx2"


def test_the_default_target_is_this_host_exactly() -> None:
    assert set(required_features(make_target("llvm"))) == host_features()


@pytest.fixture(scope="module")
def student(tiny_students, tmp_path_factory):
    student, _ = tiny_students(8, 8)
    path = tmp_path_factory.mktemp("targets") / "student.pt"
    save_student(path, student, "tinynet", 10, QuantConfig(8, 8), method="minmax", data_free=True)
    return path


def test_manifest_records_the_features_and_a_foreign_artifact_is_refused(student, tmp_path) -> None:
    here = compile_student(CompileOptions(student, "llvm", tmp_path / "here", onnx=False))
    assert set(here["isa_features"]) == host_features()
    load(tmp_path / "here")
    # built for another machine: an AMX Xeon (no AMX here: refused with the missing features named)
    foreign = compile_student(CompileOptions(student, "llvm", tmp_path / "xeon", onnx=False, mcpu="sapphirerapids"))
    assert {"amx-int8", "avx512fp16"} <= set(foreign["isa_features"])
    missing = sorted(set(foreign["isa_features"]) - host_features())
    if not missing:
        pytest.skip("this host has every Sapphire Rapids feature: nothing to refuse")
    with pytest.raises(DFQFError, match=f"compiled for a CPU with {missing[0]}.*--mcpu/--mattr"):
        load(tmp_path / "xeon")
    m = json.loads((tmp_path / "xeon" / "manifest.json").read_text())
    assert m["target_dict"]["mcpu"] == "sapphirerapids"


def test_mcpu_is_for_the_llvm_target_only(student, tmp_path) -> None:
    with pytest.raises(DFQFError, match="llvm target only"):
        compile_student(CompileOptions(student, "cuda", tmp_path / "c", mcpu="znver4"))
