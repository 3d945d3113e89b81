"""The machine and software a benchmark ran on, written next to every result."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(module: str, argv: list[str] | None = None) -> dict[str, object]:
    """Machine, software and the command (`python -m module args...`) that produced a result."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)]),
        "data_dir": os.environ.get("DFQF_DATA_DIR"),
        "git_commit": commit,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
