"""Block reconstruction (train/reconstruct.py): the cuts and blocks of a student, AdaRound's rounding, and
that reconstruction moves the student towards the teacher while staying integer-deployable."""
from __future__ import annotations

import json

import numpy as np
import torch

from core.pixels import normalize
from lower.integerize import integerize
from lower.reference import run_graph
from toolkit import make_tiny_student
from train.models import build_model
from train.quant.convert import QuantConfig, quantize_model
from train.quant.modules import QuantConv2d
from train.reconstruct import AdaRoundWeight, ReconstructionConfig, block_module, cuts, reconstruct


def _images(info, n=96, seed=1):
    px = np.random.default_rng(seed).integers(0, 256, (n, *info.input_size[1:], 3), dtype=np.uint8)
    return px, normalize(px, info.mean, info.std).contiguous()


def test_cuts_are_the_residual_stream_quantizers() -> None:
    student = quantize_model(build_model("resnet20").eval(), QuantConfig(4, 4))
    names = [c.name for c in cuts(student)]
    assert names[0] == "relu_aq" and len(names) == 9  # the stem's output and 8 of 9 block outputs
    assert all(n.endswith("_aq") and "relu" in n for n in names)


def test_blocks_compute_what_the_student_computes(tiny_students) -> None:
    student, info = tiny_students(4, 4)
    _, x = _images(info)
    graph_nodes = list(student.graph.nodes)
    inp = graph_nodes[0]
    out = next(n for n in graph_nodes if n.op == "output").args[0]
    with torch.no_grad():
        torch.testing.assert_close(block_module(student, inp, out)(x), student(x), rtol=0, atol=0)
    cut = cuts(student)[0]
    seen = {}
    hook_in = student.get_submodule(cut.target).register_forward_pre_hook(lambda m, a: seen.update(pre=a[0]))
    end = cuts(student)[1]
    hook_out = student.get_submodule(end.target).register_forward_hook(lambda m, a, o: seen.update(post=o))
    with torch.no_grad():
        student(x)
    hook_in.remove()
    hook_out.remove()
    with torch.no_grad():  # the block from the first cut's pre-quantizer value to the second cut's output
        torch.testing.assert_close(block_module(student, cut.args[0], end)(seen["pre"]), seen["post"], rtol=0, atol=0)


def test_adaround_starts_at_the_float_weight_and_ends_on_the_grid(tiny_students) -> None:
    student, _ = tiny_students(4, 4)
    conv = next(m for m in student.modules() if isinstance(m, QuantConv2d))
    r = AdaRoundWeight(conv.weight_quantizer, conv.weight)
    s = r.scale(conv.weight)
    inside = (conv.weight / s).abs() < conv.weight_quantizer.spec.qmax
    torch.testing.assert_close(r(conv.weight)[inside], conv.weight.detach()[inside], rtol=0, atol=1e-5)
    with torch.no_grad():
        r.v.uniform_(-3, 3)
    hard = r.hard_weight()
    codes = hard / s
    torch.testing.assert_close(codes, torch.round(codes), rtol=0, atol=1e-4)
    assert torch.round(codes).abs().max() <= conv.weight_quantizer.spec.qmax
    assert torch.equal(conv.weight_quantizer(hard), hard)  # the student's own quantizer keeps those codes


def test_reconstruction_moves_the_student_to_the_teacher_and_stays_deployable() -> None:
    student, info = make_tiny_student(4, 4, seed=3)
    teacher = build_model("tinynet").eval()
    px, x = _images(info, n=128)
    with torch.no_grad():
        before = float(((student(x) - teacher(x)) ** 2).mean())
    report = reconstruct(student, teacher, x, ReconstructionConfig(steps=60, batch=32))
    with torch.no_grad():
        after = float(((student(x) - teacher(x)) ** 2).mean())
    assert len(report) == len(cuts(student)) + 1 and after < before
    assert all(b["mse_after"] <= b["mse_before"] for b in report)  # a block never gets worse
    g = integerize(student, info.mean, info.std, info.input_size)
    with torch.no_grad():
        fq = student(x[:16]).double().numpy()
    got = run_graph(g, px[:16]) * g.output_scale
    assert np.abs(got - fq).max() <= 1e-4 * np.abs(fq).max() + 0.05 * fq.std()


def test_ptq_recon_method(tmp_path, capsys) -> None:
    from train.ptq import main

    out = tmp_path / "recon"
    assert main(["--method", "recon", "--arch", "tinynet", "--out", str(out), "--calib-size", "32",
                 "--zeroq-iters", "5", "--recon-steps", "10", "--batch-size", "16"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["method"] == "recon" and report["data_free"] is True and len(report["recon_blocks"]) == 3
    assert (out / "student.pt").is_file()


def test_dfqf_without_kd_saves_the_reconstructed_student(tmp_path, capsys, monkeypatch) -> None:
    """`--s-epochs 0`: no distillation; the saved student is the calibrated one, reconstructed with
    --recon-steps (every weight then on its grid: the hard rounding written back)."""
    from train.dfqf import main
    from train.student import load_student

    monkeypatch.delenv("DFQF_DATA_DIR", raising=False)
    tiny = ["--smoke", "--arch", "tinynet", "--progress", "false", "--s-epochs", "0"]
    assert main([*tiny, "--out", str(tmp_path / "calibrated")]) == 0
    assert main([*tiny, "--recon-steps", "5", "--out", str(tmp_path / "recon")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["student_steps"] == 0 and report["student_ema_decay"] is None
    stages = [json.loads(line)["stage"] for line in (tmp_path / "recon" / "metrics.jsonl").read_text().splitlines()]
    assert "reconstructed" in stages and "student" not in stages

    def off_grid(path) -> int:
        student, _ = load_student(path)
        convs = [m for m in student.modules() if isinstance(m, QuantConv2d)]
        codes = [m.weight / m.weight_quantizer.scale.reshape(-1, 1, 1, 1) for m in convs]
        return sum(int(((c - torch.round(c)).abs() > 1e-4).sum()) for c in codes)

    assert off_grid(tmp_path / "calibrated" / "student.pt") > 0  # float weights: nothing rounded them
    assert off_grid(tmp_path / "recon" / "student.pt") == 0
