"""Child processes that die with the pipeline, however the pipeline dies."""

from __future__ import annotations

import ctypes
import signal
import sys


def die_with_parent() -> None:
    """`preexec_fn` for a child: it gets SIGTERM when the process that started it dies, even by
    SIGKILL (Linux's PR_SET_PDEATHSIG), so no converter, quantizer or server outlives a stage."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
