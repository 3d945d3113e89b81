"""What the CPU lets this process use: Linux's opt-in for the AMX tile state.

Linux (5.16+) enables AMX per process: before its first tile instruction a process asks for the XTILEDATA
state component with `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`; a tile instruction without that
permission stops the process with SIGILL. `request_amx()` asks once (the grant holds for every thread of the
process) and says whether AMX may be used; the runtime calls it before it runs a module built with AMX.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform

from .errors import DFQFError

SYS_ARCH_PRCTL = 158  # x86-64
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


@functools.cache
def _request() -> str | None:
    """None when the process may use AMX tiles, else why not (one line)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"AMX needs Linux on x86-64 (this is {platform.system()} on {platform.machine()})"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0:
        return f"Linux refused the AMX tile state (arch_prctl: {os.strerror(ctypes.get_errno())})"
    return None


def request_amx() -> None:
    """Ask Linux for the AMX tile state for this process (once); a DFQFError when it is refused."""
    why = _request()
    if why is not None:
        raise DFQFError(f"{why}: this module uses AMX kernels; compile it with --schedules x86_vnni for this host")


def amx_granted() -> bool:
    """Whether this process may run AMX tile instructions (asks Linux once)."""
    return _request() is None
