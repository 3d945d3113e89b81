"""Feature distillation (`train.feature_kd`): student quantizers paired with teacher nodes by name, the
teacher's tapped features equal its own forward, and the loss against a float64 NumPy reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.feature_kd import FeatureDistiller
from train.models import build_model
from train.quant.calibrate import calibrate
from train.quant.convert import QuantConfig, quantize_model


@pytest.fixture(scope="module")
def teacher_and_student():
    torch.manual_seed(0)
    teacher = build_model("tinynet").eval()
    for m in teacher.modules():  # non-trivial BN statistics, so that folding changes the convs
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    student = quantize_model(teacher, QuantConfig(wbits=4, abits=4))
    x = torch.randn(8, 3, 16, 16)
    calibrate(student, [x], "mse")
    return teacher, student, x


def test_pairs_are_the_quantizers_with_a_teacher_node(teacher_and_student) -> None:
    teacher, student, _ = teacher_and_student
    fd = FeatureDistiller(teacher, student)
    try:
        quantizers = [n for n, _ in student.named_modules() if n.endswith("_aq")]
        assert "input_aq" in quantizers and "input_aq" not in [q for q, _ in fd.pairs]  # no teacher node "input"
        assert [q for q, _ in fd.pairs] == [q for q in quantizers if q != "input_aq"]
        assert all(q == node + "_aq" for q, node in fd.pairs)
    finally:
        fd.remove()


def test_teacher_taps_equal_the_teacher_modules_outputs(teacher_and_student) -> None:
    teacher, student, x = teacher_and_student
    fd = FeatureDistiller(teacher, student)
    fd.remove()
    seen: dict[str, torch.Tensor] = {}
    modules = {name.replace(".", "_"): m for name, m in teacher.named_modules()}
    hooks = [modules[node].register_forward_hook(lambda m, a, out, node=node: seen.__setitem__(node, out))
             for _, node in fd.pairs]
    try:
        logits = teacher(x)
    finally:
        for h in hooks:
            h.remove()
    t_logits, feats = fd.teacher_forward(x)
    assert torch.equal(t_logits, logits)
    assert len(feats) == len(fd.pairs)
    for (_, node), f in zip(fd.pairs, feats):
        assert torch.equal(f, seen[node]), node


def test_loss_matches_float64_reference_and_trains_the_student(teacher_and_student) -> None:
    teacher, student, x = teacher_and_student
    fd = FeatureDistiller(teacher, student)
    try:
        _, t_feats = fd.teacher_forward(x)
        student.zero_grad()
        student(x)
        s_feats = [fd.recorded[q].detach().double().numpy() for q, _ in fd.pairs]
        loss = fd.loss(t_feats)
        ref = np.mean([np.mean((s - t.double().numpy()) ** 2) / np.mean(t.double().numpy() ** 2)
                       for s, t in zip(s_feats, t_feats)])
        assert loss.item() == pytest.approx(ref, rel=1e-5)
        assert loss.item() > 0  # 4-bit features differ from the float teacher
        loss.backward()
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
        assert fd.recorded == {}  # consumed
        with pytest.raises(ValueError, match="run the student first"):
            fd.loss(t_feats)
    finally:
        fd.remove()


def test_student_from_another_network_is_refused() -> None:
    torch.manual_seed(0)
    teacher = build_model("tinynet").eval()

    class Other(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="no student activation quantizer"):
        FeatureDistiller(teacher, Other())
