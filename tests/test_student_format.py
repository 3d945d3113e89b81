"""The student.pt contract (train/student.py, DESIGN §5): exact round trip, plain contents, clear errors."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from core.errors import DFQFError
from core.files import atomic_torch_save
from train.models.tiny import TinyNet
from train.quant.calibrate import calibrate
from train.quant.convert import QuantConfig, quantize_model
from train.quant.modules import ActQuantizer, WeightQuantizer
from train.quant.spec import QuantSpec
from train.student import FORMAT, VERSION, load_student, quantizer_table, read_student, save_student

PLAIN = (str, int, float, bool, type(None))



CONFIG = QuantConfig(wbits=3, abits=4, first_last_bits=8, overrides={"layer1.0.conv2": 5})


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    s = quantize_model(TinyNet(10).eval(), CONFIG)
    g = torch.Generator().manual_seed(1)
    calibrate(s, [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)])
    # move parameters off their calibrated values so a rebuilt-but-not-loaded student cannot match
    with torch.no_grad():
        for m in s.modules():
            if isinstance(m, (ActQuantizer, WeightQuantizer)):
                m.scale.mul_(1.0 + 0.1 * torch.rand(m.scale.shape, generator=g))
        s.get_submodule("linear").bias.add_(0.5)
    return s


@pytest.fixture
def saved(student, tmp_path: Path) -> Path:
    path = tmp_path / "out" / "student.pt"  # the folder does not exist yet
    save_student(path, student, "tinynet", 10, CONFIG, method="minmax", data_free=True, meta={"seed": 0, "note": "t"})
    return path


def x_batch() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def assert_plain(obj, where: str = "ckpt") -> None:
    if isinstance(obj, torch.Tensor):
        assert type(obj) is torch.Tensor and obj.device.type == "cpu", where
    elif isinstance(obj, dict):
        assert type(obj) is dict, where
        for k, v in obj.items():
            assert isinstance(k, str), f"{where}: key {k!r}"
            assert_plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            assert_plain(v, f"{where}[{i}]")
    else:
        assert isinstance(obj, PLAIN), f"{where}: {type(obj).__name__}"


# ---------------------------------------------------------------------------------------------------
# round trip
# ---------------------------------------------------------------------------------------------------
def test_round_trip_identical_outputs_and_table(student, saved: Path) -> None:
    loaded, ckpt = load_student(saved)
    assert not loaded.training
    x = x_batch()
    with torch.no_grad():
        a, b = student(x), loaded(x)
    assert torch.equal(a, b)
    # a freshly rebuilt (uncalibrated) student does not match: the check above is meaningful
    with torch.no_grad():
        fresh = quantize_model(TinyNet(10).eval(), CONFIG)(x)
    assert not torch.equal(fresh, a)

    t1, t2 = quantizer_table(student), quantizer_table(loaded)
    assert t1.keys() == t2.keys() == ckpt["quantizers"].keys()
    for name in t1:
        for t in (t2, ckpt["quantizers"]):
            assert t[name]["kind"] == t1[name]["kind"]
            assert t[name]["spec"] == t1[name]["spec"]
            assert torch.equal(t[name]["scale"], t1[name]["scale"])
            assert torch.equal(t[name]["zero_point"], t1[name]["zero_point"])
    assert t2["layer1.0.conv2"]["spec"]["bits"] == 5 and t2["layer1.0.conv1"]["spec"]["bits"] == 3
    sd1, sd2 = student.state_dict(), loaded.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_checkpoint_contents(student, saved: Path) -> None:
    ckpt = torch.load(saved, map_location="cpu", weights_only=True)
    assert_plain(ckpt)
    assert ckpt["format"] == FORMAT == "dfqf.student" and ckpt["version"] == VERSION == 1
    assert ckpt["arch"] == "tinynet" and ckpt["arch_kwargs"] == {"num_classes": 10}
    assert ckpt["input"]["size"] == [3, 16, 16] and len(ckpt["input"]["mean"]) == len(ckpt["input"]["std"]) == 3
    assert ckpt["quant_config"] == CONFIG.to_dict()
    assert ckpt["method"] == "minmax" and ckpt["data_free"] is True and ckpt["meta"] == {"seed": 0, "note": "t"}
    # quantizer table: weight entries under the layer name, activation entries '<node>_aq'
    q = ckpt["quantizers"]
    kinds = {k: v["kind"] for k, v in q.items()}
    n_layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in student.modules())
    assert sum(k == "weight" for k in kinds.values()) == n_layers
    assert kinds["conv1"] == "weight" and kinds["linear"] == "weight" and kinds["input_aq"] == "activation"
    assert all(name.endswith("_aq") for name, k in kinds.items() if k == "activation")
    for name, e in q.items():
        spec = QuantSpec.from_dict(e["spec"])
        assert e["scale"].dtype == torch.float32 and e["zero_point"].dtype == torch.int32
        if e["kind"] == "weight":
            assert spec.granularity == "channel" and e["scale"].shape == e["zero_point"].shape
            assert e["scale"].numel() == student.get_submodule(name).weight.shape[0]
        else:
            assert e["scale"].dim() == 0
    # BN folded: every conv/linear has a bias in the state_dict; no BN keys
    sd = ckpt["state_dict"]
    assert not any("running_mean" in k or k.startswith("bn") for k in sd)
    for name, m in student.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            assert f"{name}.bias" in sd and f"{name}.weight" in sd


def test_read_student_returns_validated_dict(saved: Path) -> None:
    ckpt = read_student(saved)
    assert ckpt["format"] == FORMAT and "state_dict" in ckpt


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DFQFError, match="not found"):
        load_student(tmp_path / "nope.pt")
    with pytest.raises(DFQFError):
        read_student(tmp_path)  # a folder is not a student file


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n", bytes(range(256)) * 4])
def test_garbage_file(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "garbage.pt"
    p.write_bytes(content)
    with pytest.raises(DFQFError):
        load_student(p)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "code.pt"
    torch.save({"format": FORMAT, "version": VERSION, "obj": TinyNet(2)}, p)  # needs unpickling a class
    with pytest.raises(DFQFError):
        load_student(p)


def _save_variant(saved: Path, tmp_path: Path, edit) -> Path:
    ckpt = torch.load(saved, weights_only=True)
    c = copy.deepcopy(ckpt)
    new = edit(c)
    ckpt = c if new is None else new
    p = tmp_path / "variant.pt"
    torch.save(ckpt, p)
    return p


def _set(d: dict, key: str, value) -> None:
    d[key] = value


def _pop(d: dict, key: str) -> None:
    del d[key]


@pytest.mark.parametrize("edit", [
    pytest.param(lambda c: {"weights": c["state_dict"]}, id="not-a-student"),
    pytest.param(lambda c: [c], id="list"),
    pytest.param(lambda c: c["state_dict"], id="plain-state-dict"),
    pytest.param(lambda c: _set(c, "format", "dfqf.teacher"), id="format"),
    pytest.param(lambda c: _set(c, "version", 2), id="version"),
    pytest.param(lambda c: _pop(c, "state_dict"), id="no-state-dict"),
    pytest.param(lambda c: _pop(c, "quantizers"), id="no-quantizers"),
    pytest.param(lambda c: _set(c, "arch", "no_such_arch"), id="unknown-arch"),
    pytest.param(lambda c: _set(c, "arch", "resnet20"), id="other-arch"),
    pytest.param(lambda c: _set(c["arch_kwargs"], "num_classes", 5), id="num-classes"),
    pytest.param(lambda c: _set(c["quant_config"], "wbits", 9), id="config-bits"),
    pytest.param(lambda c: _set(c["quant_config"], "abits", 2), id="config-mismatch"),
    pytest.param(lambda c: _pop(c["state_dict"], "conv1.weight"), id="missing-weight"),
    pytest.param(lambda c: _set(c["state_dict"], "conv1.weight", torch.zeros(2)), id="weight-shape"),
    pytest.param(lambda c: _set(c["quantizers"]["relu_aq"]["spec"], "signed", True), id="spec-differs"),
    pytest.param(lambda c: _pop(c["quantizers"], "relu_aq"), id="quantizer-entry-missing"),
    pytest.param(lambda c: _set(c["quantizers"]["relu_aq"]["spec"], "bits", 30), id="spec-invalid"),
    pytest.param(lambda c: _set(c["quant_config"], "group_size", 8), id="config-unknown-key"),
    pytest.param(lambda c: _set(c["arch_kwargs"], "depth", 3), id="arch-kwargs-unknown-key"),
    pytest.param(lambda c: _set(c, "state_dict", 5), id="state-dict-not-dict"),
])
def test_wrong_format_raises_dfqf_error(saved: Path, tmp_path: Path, edit) -> None:
    p = _save_variant(saved, tmp_path, edit)
    with pytest.raises(DFQFError):
        load_student(p)


# ---------------------------------------------------------------------------------------------------
# atomic save
# ---------------------------------------------------------------------------------------------------
def test_atomic_save_leaves_only_the_target(tmp_path: Path) -> None:
    d = tmp_path / "new" / "folder"
    target = d / "x.pt"
    atomic_torch_save({"a": torch.arange(3)}, target)
    atomic_torch_save({"a": torch.arange(5)}, target)  # overwrite
    assert sorted(os.listdir(d)) == ["x.pt"]
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.arange(5))


def test_atomic_save_failure_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "x.pt"
    atomic_torch_save({"a": torch.ones(2)}, target)
    with pytest.raises(Exception):
        atomic_torch_save({"f": lambda: 0}, target)  # cannot be pickled
    assert os.listdir(tmp_path) == ["x.pt"]
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))


def test_atomic_save_failure_during_fsync(tmp_path: Path, monkeypatch) -> None:
    import core.files as S

    def boom(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(S.os, "fsync", boom)
    with pytest.raises(OSError):
        atomic_torch_save({"a": torch.ones(2)}, tmp_path / "y.pt")
    assert os.listdir(tmp_path) == []


def test_write_json_atomic_round_trips_and_leaves_no_temp(tmp_path: Path) -> None:
    import json

    from core.files import write_json_atomic

    write_json_atomic({"a": [1, 2.5, None]}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": [1, 2.5, None]}
    assert os.listdir(tmp_path) == ["r.json"]
