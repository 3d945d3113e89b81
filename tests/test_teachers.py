"""Teacher registry: the shared pretrained teachers load strictly; default weights resolve or fail clearly."""
from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch

from core.errors import DFQFError
from train.models import ARCHS, build_model, load_teacher, resolve_weights
from train.models.registry import EXPORTED, read_state_dict

TEACHER_FILES = {"resnet20_cifar10.pt": "resnet20", "resnet20_cifar10_jpeg.pt": "resnet20",
                 "resnet56_cifar10.pt": "resnet56"}


@pytest.mark.parametrize("file, arch", TEACHER_FILES.items())
def test_shared_teachers_load_strictly(shared_data: Path, file: str, arch: str) -> None:
    state = read_state_dict(shared_data / "teachers" / file)
    model = build_model(arch)
    model.load_state_dict(state, strict=True)  # raises on any missing/unexpected key
    assert set(state) == {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}


def test_option_a_shortcut_pads_both_sides(shared_data: Path) -> None:
    """With padding only at the end the public teacher collapses (~14 % top-1); both sides keep it confident."""
    model = load_teacher("resnet20", shared_data / "teachers" / "resnet20_cifar10.pt")
    block = model.layer2[0]
    x = torch.randn(1, 16, 8, 8)
    y = block.shortcut(x)
    assert y.shape == (1, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2]) and not y[:, :8].any() and not y[:, 24:].any()


def test_default_weights_come_from_data_dir(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DFQF_DATA_DIR", str(shared_data))
    assert resolve_weights("resnet20", None) == shared_data / "teachers" / "resnet20_cifar10.pt"


def test_default_weights_offline_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DFQF_DATA_DIR", raising=False)
    monkeypatch.setenv("DFQF_CACHE_DIR", str(tmp_path))

    def offline(url: str, dst: str, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(DFQFError, match="pass --weights PATH or set DFQF_DATA_DIR"):
        resolve_weights("resnet20", None)


def test_checkpoint_wrappers_and_module_prefix_are_accepted(tmp_path: Path) -> None:
    """The public akamaster files are {'state_dict': {'module.conv1.weight': ...}, 'best_prec1': ...}."""
    model = build_model("resnet20")
    wrapped = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "best_prec1": 91.7}
    torch.save(wrapped, tmp_path / "w.th")
    loaded = load_teacher("resnet20", tmp_path / "w.th")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_mismatched_weights_name_the_keys(tmp_path: Path) -> None:
    torch.save(build_model("resnet20").state_dict(), tmp_path / "r20.pt")
    with pytest.raises(DFQFError, match=r"missing keys \[layer1\.3"):
        load_teacher("resnet56", tmp_path / "r20.pt")


def test_every_arch_declares_its_input_contract() -> None:
    for info in ARCHS.values():
        assert len(info.mean) == len(info.std) == info.input_size[0] == 3
        # a user's exported model (registered by other tests in this process) has no data set of its own
        assert info.dataset in ("cifar10", "imagenet", "synthetic") or (
            info.name.startswith(EXPORTED) and info.dataset == "custom")
