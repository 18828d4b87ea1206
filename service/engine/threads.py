"""OS-level thread names, so per-thread CPU (/proc/PID/task/*/comm, top -H) tells the inference
thread from the store's writer; Python's own thread names stay inside Python."""

from __future__ import annotations

import ctypes
import ctypes.util

_PR_SET_NAME = 15
_libc: ctypes.CDLL | None = None


def name_this_thread(name: str) -> None:
    """Set the calling thread's OS name (at most 15 bytes); does nothing where prctl is missing."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass
