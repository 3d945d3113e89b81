"""`--protocol paper`: the DFQF paper's fake-quant-only student (BN unfolded and trained, per-tensor weights,
float residual sums), beside the integer protocol it must not disturb, and refused by the lowering."""
from __future__ import annotations

import json
import operator

import pytest
import torch
from torch import nn

from core.errors import DFQFError
from toolkit import batch, main_in_process, one_error_line, teacher
from train.dfqf_config import DFQFConfig, resolve
from train.quant.calibrate import _quant_error, calibrate, weight_range
from train.quant.convert import QuantConfig, quantize_model
from train.quant.modules import ActQuantizer, WeightQuantizer, quantization_disabled
from train.quant.spec import weight_spec
from train.student import load_student

PAPER = QuantConfig(4, 4, 8, protocol="paper")


def _modules(gm, kind) -> dict[str, nn.Module]:
    return {name: m for name, m in gm.named_modules() if isinstance(m, kind)}


def _consumers_of_quantizers(gm) -> set[type]:
    kinds = set()
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ActQuantizer):
            kinds |= {type(gm.get_submodule(u.target)) if u.op == "call_module" else u.target for u in n.users}
    return kinds


@pytest.mark.parametrize("arch", ["resnet20", "mobilenet_v2"])
def test_the_paper_student_keeps_bn_and_quantizes_only_layer_inputs(arch: str) -> None:
    t = teacher(arch)
    student = quantize_model(t, PAPER).eval()
    assert len(_modules(student, nn.BatchNorm2d)) == len(_modules(t, nn.BatchNorm2d)) > 10
    weights = _modules(student, WeightQuantizer)
    assert weights and all(q.spec.granularity == "tensor" and q.scale.numel() == 1 for q in weights.values())
    consumers = _consumers_of_quantizers(student)  # only convs and linears read quantized activations
    assert consumers and all(isinstance(k, type) and issubclass(k, (nn.Conv2d, nn.Linear)) for k in consumers)
    adds = [n for n in student.graph.nodes if n.target in (operator.add, operator.iadd, torch.add)]
    assert adds and not any(isinstance(student.get_submodule(a.target), ActQuantizer)
                            for n in adds for a in n.args if a.op == "call_module")
    x = batch(arch, 2)
    with torch.no_grad(), quantization_disabled(student):
        assert torch.equal(student(x), t(x))  # nothing folded: the very same float arithmetic
    integer = quantize_model(t, QuantConfig(4, 4, 8))
    assert not _modules(integer, nn.BatchNorm2d)
    assert all(q.spec.granularity == "channel" for q in _modules(integer, WeightQuantizer).values())


def test_bn_learns_and_tracks_batch_statistics_in_train_mode() -> None:
    student = quantize_model(teacher("resnet20"), PAPER)
    calibrate(student, [batch("resnet20", 8)], "minmax")
    bn = student.get_submodule("layer1.0.bn1")
    before = bn.running_mean.clone()
    student.eval()(batch("resnet20", 4))
    assert torch.equal(bn.running_mean, before)
    student.train()
    student(batch("resnet20", 4, seed=2)).square().mean().backward()
    assert not torch.equal(bn.running_mean, before) and bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    assert student.conv1.weight_quantizer.scale.grad is not None  # the learnable per-tensor clip


def test_per_tensor_weight_ranges() -> None:
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    w[3] *= 5  # one wide channel: a per-tensor step must cover it
    spec = weight_spec(4, "tensor")
    lo, hi = weight_range(w, spec, "minmax")
    assert lo.shape == hi.shape == (1,) and lo.item() == w.min().item() and hi.item() == w.max().item()
    mlo, mhi = weight_range(w, spec, "mse")
    flat = w.reshape(1, -1)
    assert mhi.item() < hi.item() and _quant_error(flat, mlo, mhi, spec, 0) < _quant_error(flat, lo, hi, spec, 0)
    assert weight_range(w, weight_spec(4), "minmax")[0].shape == (8,)


def test_an_unfoldable_bn_is_refused_by_the_integer_protocol_only() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 10))
    with pytest.raises(DFQFError, match="cannot be folded"):
        quantize_model(model.eval(), QuantConfig())
    assert len(_modules(quantize_model(model.eval(), PAPER), nn.BatchNorm2d)) == 1


def test_the_protocol_flag_and_config() -> None:
    assert resolve(["--protocol", "paper"]).quant_config().protocol == "paper"
    assert resolve([]).quant_config() == QuantConfig(4, 4, 8)
    with pytest.raises(DFQFError, match="protocol"):
        QuantConfig(protocol="float")
    with pytest.raises(DFQFError):
        DFQFConfig(protocol="float")
    with pytest.raises(DFQFError, match="--s-bn applies to --protocol paper only"):
        resolve(["--s-bn", "frozen"])
    assert resolve(["--s-bn", "frozen", "--protocol", "paper"]).s_bn == "frozen"
    # a run folder made before the flag existed still resumes (it ran the integer protocol)
    saved = {k: v for k, v in DFQFConfig().result_fields().items() if k not in ("protocol", "s_bn")}
    assert DFQFConfig().resume_differences(saved) == []
    assert DFQFConfig(protocol="paper").resume_differences(saved) == ["protocol"]


def test_ptq_saves_a_paper_student_that_lowering_refuses(tmp_path, capsys) -> None:
    weights = tmp_path / "t.pt"
    torch.save(teacher("tinynet").state_dict(), weights)
    common = ["--arch", "tinynet", "--weights", weights, "--calib-size", "8", "--protocol", "paper"]
    code, out, err = main_in_process("train.ptq", ["--method", "minmax", *common, "--out", tmp_path / "q"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["protocol"] == "paper"
    student, ckpt = load_student(tmp_path / "q" / "student.pt")
    assert ckpt["quant_config"]["protocol"] == "paper" and _modules(student, nn.BatchNorm2d)
    line = one_error_line(*main_in_process("lower.compile", [tmp_path / "q" / "student.pt", "--out",
                                                             tmp_path / "art"], capsys))
    assert "--protocol paper student" in line and not (tmp_path / "art").exists()
    line = one_error_line(*main_in_process("train.ptq", ["--method", "dfq", *common, "--out", tmp_path / "d"], capsys))
    assert "no --protocol paper" in line


@pytest.mark.parametrize("s_bn", ["train", "frozen"])
def test_dfqf_trains_the_paper_students_bn(s_bn: str, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code, stdout, err = main_in_process("train.dfqf", ["--smoke", "--arch", "tinynet", "--progress", "false",
                                                       "--protocol", "paper", "--s-bn", s_bn, "--out", out], capsys)
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["protocol"] == "paper"
    student, _ = load_student(out / "student.pt")
    fp = teacher("tinynet")
    bns = _modules(student, nn.BatchNorm2d)
    moved = {name for name, m in bns.items() if not torch.equal(m.running_mean, fp.get_submodule(name).running_mean)}
    learned = {name for name, m in bns.items() if not torch.equal(m.weight, fp.get_submodule(name).weight)}
    # train: every BN tracked the synthetic batches' statistics; frozen: the teacher's statistics, kept
    assert moved == (set(bns) if s_bn == "train" else set())
    assert learned == set(bns)  # the affine parameters train either way
