"""Child processes that die with their parent (Linux ``PR_SET_PDEATHSIG``), in their own process group."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def _child_setup(sig: int) -> None:
    os.setsid()                                   # own process group: the parent can stop it as a whole
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
        except (OSError, AttributeError):
            pass


def popen_tied(cmd, sig: int = signal.SIGTERM, **kwargs) -> subprocess.Popen:
    """``Popen`` whose process gets ``sig`` when this process dies, even by SIGKILL."""
    return subprocess.Popen(cmd, preexec_fn=lambda: _child_setup(sig), **kwargs)


def stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``timeout``."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
