"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA_DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder ($DFQF_DATA_DIR, else <workspace>/shared/data); skips when absent."""
    env = os.environ.get("DFQF_DATA_DIR")
    path = Path(env) if env else SHARED_DATA_DEFAULT
    if not (path / "cifar10").is_dir() or not (path / "teachers").is_dir():
        pytest.skip(f"shared data not found at {path} (set DFQF_DATA_DIR to the folder with cifar10/ and teachers/)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests use tiny models, for which thread start-up dominates: one thread is much faster (and steadier)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_tiny_student(wbits: int = 8, abits: int = 8, seed: int = 0):
    """A calibrated fake-quant TinyNet student (16x16 input, 10 classes) and its ArchInfo: the standard
    fixture for lowering tests. Calibrated with MSE ranges on seeded random pixels."""
    import numpy as np
    import torch

    from train.data import normalize
    from train.models import build_model, get_arch
    from train.quant.calibrate import calibrate
    from train.quant.convert import QuantConfig, quantize_model

    info = get_arch("tinynet")
    torch.manual_seed(seed)
    student = quantize_model(build_model("tinynet").eval(), QuantConfig(wbits=wbits, abits=abits))
    c, h, w = info.input_size
    pixels = np.random.default_rng(seed).integers(0, 256, (64, h, w, c), dtype=np.uint8)
    calibrate(student, [normalize(pixels, info.mean, info.std)], "mse")
    return student, info


@pytest.fixture(scope="session")
def tiny_students():
    """{(wbits, abits): (student, info)} for W8A8, W4A4 and W3A5 (built on first use)."""
    cache: dict = {}

    def get(wbits: int, abits: int):
        if (wbits, abits) not in cache:
            cache[wbits, abits] = make_tiny_student(wbits, abits)
        return cache[wbits, abits]

    return get
