"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from toolkit import make_tiny_student

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


@pytest.fixture(scope="session")
def tiny_students():
    """(wbits, abits[, residual_bits]) -> (student, info), built on first use."""
    cache: dict = {}

    def get(wbits: int, abits: int, residual_bits: int | None = None):
        key = (wbits, abits, residual_bits)
        if key not in cache:
            cache[key] = make_tiny_student(wbits, abits, residual_bits=residual_bits)
        return cache[key]

    return get
