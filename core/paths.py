"""Where the toolchain keeps its downloads and finds the user's data folder."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import DFQFError


def cache_dir() -> Path:
    """$DFQF_CACHE_DIR, else ~/.cache/dfqf (downloaded teachers, compiled helper libraries)."""
    return Path(os.environ.get("DFQF_CACHE_DIR", Path.home() / ".cache" / "dfqf"))


def data_dir_from_env() -> Path | None:
    """$DFQF_DATA_DIR as a path, or None when it is unset or empty."""
    d = os.environ.get("DFQF_DATA_DIR")
    return Path(d) if d else None


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The data folder: `data_dir` if given, else $DFQF_DATA_DIR; it must exist."""
    path = Path(data_dir) if data_dir is not None else data_dir_from_env()
    if path is None:
        raise DFQFError("no data folder: pass --data-dir or set DFQF_DATA_DIR")
    if not path.is_dir():
        raise DFQFError(f"data folder not found: {path}")
    return path


def optional_data_dir(data_dir: str | Path | None) -> Path | None:
    """The data folder when one is given or set in $DFQF_DATA_DIR (it must then exist), else None."""
    return resolve_data_dir(data_dir) if data_dir is not None or data_dir_from_env() is not None else None
