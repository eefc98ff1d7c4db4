"""Processes: children that die with the pipeline, however it dies, and this process's rank in a
distributed run."""

from __future__ import annotations

import ctypes
import signal
import sys


def die_with_parent() -> None:
    """`preexec_fn` for a child: it gets SIGTERM when the process that started it dies, even by
    SIGKILL (Linux's PR_SET_PDEATHSIG), so no converter, quantizer or server outlives a stage."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def process_state():
    """This process's place in the run: one process, or one rank under `accelerate launch`."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Without cpu=True, a CPU-only machine is DistributedType.NO and every rank would believe it
    # is the main process. Must be the first PartialState of the process.
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
