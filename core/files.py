"""Atomic file writes (a temp file in the same folder, fsync, rename: never a half-written file) and hashing."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def atomic_write(path: str | Path, mode: str, write: Callable[[IO], None]) -> None:
    """Call `write(file)` on a temp file next to `path`, fsync it, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600: a written file is as readable as any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(obj: Any, path: str | Path) -> None:
    """Indented JSON with a final newline, atomically."""
    atomic_write(path, "w", lambda f: f.write(json.dumps(obj, indent=2) + "\n"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save, atomically."""
    import torch

    atomic_write(path, "wb", lambda f: torch.save(obj, f))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable(path: str | Path) -> None:
    """A file can be created at `path` (its folder is made if needed): checked before long work, so that no
    result is lost when it is written at the end. Raises OSError otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}."):
        pass


def load_torch_file(path: str | Path, what: str) -> Any:
    """torch.load of a file a user may have received, with `weights_only=True`: tensors and plain data only,
    never code. Every failure is one DFQFError naming `what` (a file with pickled objects is refused with
    the reason, not torch's long advice on how to load it anyway)."""
    import pickle

    import torch

    from .errors import DFQFError, first_line

    path = Path(path)
    if not path.is_file():
        raise DFQFError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DFQFError(f"cannot read {what} {path}: it holds pickled Python objects, not only tensors and plain "
                        "data; it is refused because loading it could run code (save a state_dict instead)"
                        ) from None
    except Exception as e:  # noqa: BLE001 - truncated, garbage, not a torch file
        raise DFQFError(f"cannot read {what} {path}: {first_line(e)}") from None
