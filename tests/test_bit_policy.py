"""Mixed-precision policies: --residual-bits (the residual stream at other bits) and --bits-override
(per-quantizer bits by name or fnmatch pattern), from QuantConfig through the CLIs to the integer graph."""
from __future__ import annotations

import json

import pytest
import torch

from core.cli import bits_map
from core.errors import DFQFError
from lower.integerize import integerize
from toolkit import assert_exact, main_in_process, one_error_line, teacher
from train.dfqf_config import DFQFConfig, resolve
from train.quant.convert import QuantConfig, quantize_model
from train.quant.modules import ActQuantizer, QuantConv2d
from train.reconstruct import cuts


def _act_bits(student) -> dict[str, int]:
    return {name: m.spec.bits for name, m in student.named_modules() if isinstance(m, ActQuantizer)}


def test_residual_bits_raise_exactly_the_shared_activations() -> None:
    student = quantize_model(teacher("resnet20"), QuantConfig(4, 4, 8, residual_bits=8))
    bits = _act_bits(student)
    shared = {n.target for n in cuts(student)}  # quantizers more than one layer reads
    assert len(shared) == 9  # the stem output and the outputs of blocks 1..8 feed a shortcut and a conv
    assert {bits[n] for n in shared} == {8}
    edge = {"input_aq", "pool_aq"}  # the first conv's and the linear's inputs: first_last_bits
    assert {bits[n] for n in edge} == {8}
    assert {b for n, b in bits.items() if n not in shared | edge} == {4}
    assert _act_bits(quantize_model(teacher("resnet20"), QuantConfig(4, 4, 8))).keys() == bits.keys()


def test_overrides_by_name_and_pattern() -> None:
    config = QuantConfig(4, 4, 8, overrides={"layer3_*_aq": 6, "layer3_0_relu1_aq": 3, "layer2.0.conv1": 8})
    student = quantize_model(teacher("resnet20"), config)
    bits = _act_bits(student)
    assert bits["layer3_0_relu1_aq"] == 3  # the exact name wins over the pattern
    assert {b for n, b in bits.items() if n.startswith("layer3_") and n != "layer3_0_relu1_aq"} == {6}
    assert bits["layer2_1_relu1_aq"] == 4
    weights = {name: m.weight_quantizer.spec.bits for name, m in student.named_modules() if isinstance(m, QuantConv2d)}
    assert weights["layer2.0.conv1"] == 8 and weights["layer2.0.conv2"] == 4


def test_an_override_that_matches_nothing_is_refused() -> None:
    with pytest.raises(DFQFError, match="layer9_.* match no quantizer of this model"):
        quantize_model(teacher("resnet20"), QuantConfig(overrides={"layer9_*": 8}))


@pytest.mark.parametrize("config", [{"residual_bits": 9}, {"overrides": {"x": 1}}, {"overrides": {"": 4}},
                                    {"overrides": ["x"]}])
def test_bad_policies_are_one_error(config) -> None:
    with pytest.raises(DFQFError):
        QuantConfig(**config)


def test_bits_map_and_the_config_fields(tmp_path) -> None:
    assert bits_map("a=8,layer*_aq=6") == {"a": 8, "layer*_aq": 6}
    for bad in ("a", "=8", "a=x"):
        with pytest.raises(Exception, match="NAME=BITS"):
            bits_map(bad)
    c = resolve(["--residual-bits", "8", "--bits-override", "layer3_*_aq=6"])
    assert c.quant_config() == QuantConfig(4, 4, 8, {"layer3_*_aq": 6}, residual_bits=8)
    for bad in ({"bits_override": {"a": "8"}}, {"bits_override": {"a": 12}}, {"residual_bits": 8.0}):
        with pytest.raises(DFQFError):
            DFQFConfig(**bad)
    # a run folder made before these fields existed still resumes (they compare at their defaults)
    saved = {k: v for k, v in DFQFConfig().result_fields().items() if k not in ("residual_bits", "bits_override")}
    assert DFQFConfig().resume_differences(saved) == []
    (tmp_path / "c.json").write_text(json.dumps({"bits_override": {"fc": 9}}))
    with pytest.raises(DFQFError, match="bits_override"):
        resolve(["--config", str(tmp_path / "c.json")])


def test_ptq_writes_the_policy_into_the_student(tmp_path, capsys) -> None:
    from train.student import load_student

    weights = tmp_path / "t.pt"
    torch.save(teacher("tinynet").state_dict(), weights)
    code, out, err = main_in_process("train.ptq", ["--method", "minmax", "--arch", "tinynet", "--weights", weights,
                                                   "--residual-bits", "8", "--calib-size", "8", "--out",
                                                   tmp_path / "q"], capsys)
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["residual_bits"] == 8 and report["overrides"] == {}
    student, ckpt = load_student(tmp_path / "q" / "student.pt")
    assert ckpt["quant_config"]["residual_bits"] == 8
    assert sorted(set(_act_bits(student).values())) == [4, 8]
    assert "match no quantizer" in one_error_line(*main_in_process(
        "train.ptq", ["--method", "minmax", "--arch", "tinynet", "--weights", weights, "--bits-override", "nope=8",
                      "--calib-size", "8", "--out", tmp_path / "q2"], capsys))


def test_an_8bit_residual_stream_lowers_exactly(tiny_students) -> None:
    student, info = tiny_students(4, 4, 8)
    g = integerize(student, info.mean, info.std, info.input_size)
    shared = {n.target for n in cuts(student)}
    assert shared and all(g.tensors[name].bits == 8 for name in shared if name in g.tensors)
    assert_exact(g)
