"""Atomic artifact writes: a temp file in the same folder, fsync, then rename — never a half-written file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

import torch


def _atomic_write(path: Path, mode: str, write: Callable[[IO], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save, atomically."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def write_json_atomic(obj: Any, path: Path) -> None:
    """Indented JSON with a final newline, atomically."""
    _atomic_write(path, "w", lambda f: f.write(json.dumps(obj, indent=2) + "\n"))
