"""Resumable run state: atomic checkpoints and an append-only metrics log that survives SIGKILL.

The checkpoint `<out>/checkpoint.pt` holds every tensor state (generator, student, optimizers,
schedulers, RNG), the position in the schedule (stage, step) and the number of lines of
`metrics.jsonl` that belong to it; on resume the log is cut back to that many lines, so a run killed
between a log line and the next checkpoint does not log any step twice. It is loaded with
`weights_only=True`: a checkpoint someone else wrote cannot run code.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from core.errors import DFQFError
from core.files import atomic_torch_save, load_torch_file

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CHECKPOINT_KEYS = ("stage", "step", "images_generated", "wall_seconds", "metrics_lines", "generator", "student",
                   "g_opt", "s_opt", "s_sched", "rng", "config", "student_ema")


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
    """The checkpoint in `out` (None if there is none yet); a file that is not one is a DFQFError."""
    path = out / CHECKPOINT
    if not path.exists():
        return None
    ck = load_torch_file(path, "checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise DFQFError(f"{path} is not a train.dfqf checkpoint (lacks {', '.join(missing[:4])})")
    return ck
