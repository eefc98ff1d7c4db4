"""One run per run dir: an exclusive `flock` on `run_dir/.lock`, held for the life of the process.

The kernel releases the lock when its process dies, SIGKILL included, so a lock left by a killed run
never blocks the next one; the pid written into the file only names the holder in the refusal. The
descriptor is not inherited by child processes (Python opens it close-on-exec), so a server a stage
started cannot keep holding it.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from pipeline.run.errors import PipelineError
from pipeline.run.layout import RunDir


class RunDirBusy(PipelineError, RuntimeError):
    """Another live process holds the run dir."""


_held: dict[Path, int] = {}  # run dir -> descriptor of its lock file, for this process


def hold_run_dir(run_dir: Path) -> None:
    """Take the run dir's lock for this process, or raise RunDirBusy naming the holder's pid."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunDir(run_dir).lock
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid, _, since = os.pread(fd, 200, 0).decode(errors="replace").strip().partition(" ")
        os.close(fd)
        raise RunDirBusy(
            f"run_dir={run_dir} is in use by another run (pid {pid or 'unknown'}"
            f"{', started ' + since if since else ''}); wait for it to finish, or choose another run_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
    _held[run_dir] = fd
