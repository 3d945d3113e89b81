"""Resumable run state: atomic checkpoints and an append-only metrics log that survives SIGKILL.

The checkpoint `<out>/checkpoint.pt` holds every tensor state (generator, student, optimizers,
schedulers, RNG), the position in the schedule (stage, step) and the number of lines of
`metrics.jsonl` that belong to it; on resume the log is cut back to that many lines, so a run killed
between a log line and the next checkpoint does not log any step twice.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DFQFError, first_line
from .artifacts import atomic_torch_save

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, flushed and fsynced in batches."""

    def __init__(self, path: Path, keep_lines: int | None = None) -> None:
        self.path = path
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        if keep_lines is not None and len(lines) > keep_lines:
            lines = lines[:keep_lines]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(lines))
            os.replace(tmp, path)
        self.lines = len(lines)
        self.file = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.lines += 1

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    atomic_torch_save(state, out / CHECKPOINT)


def load_checkpoint(out: Path) -> dict[str, Any] | None:
    path = out / CHECKPOINT
    if not path.exists():
        return None
    try:
        # the checkpoint holds Python RNG state (tuples) and optimizer state: written by this program
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise DFQFError(f"cannot read checkpoint {path}: {first_line(e)}") from None
