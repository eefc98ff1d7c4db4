"""The stage table declares what each stage reads: every file a stage opens in the run dir is one of
its declared inputs (or a file it made itself), and every declared input is opened. Watched with
Linux inotify, so opens by any process count: Python, the Rust safetensors reader, llama.cpp's C++
loader, the converter subprocess and the servers."""

from __future__ import annotations

import ctypes
import os
import select
import struct
import sys
import threading
from pathlib import Path

import pytest
from conftest import run_pipeline
from hydra import compose, initialize_config_dir

import pipeline.config
from pipeline.run.layout import RunDir
from pipeline.stages import STAGES

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")

ROOT = Path(__file__).resolve().parents[1]
IN_OPEN, IN_Q_OVERFLOW, IN_ISDIR = 0x20, 0x4000, 0x40000000
# Written or read by the runner around every stage, not by the stage: Hydra's log and saved config,
# and the manifest (the record of the inputs, not one of them).
RUNNER_FILES = ("__main__.log", "manifest.json", ".hydra/", ".lock")


class OpenWatch:
    """Paths opened under some directories while the block runs (inotify IN_OPEN, read by a thread
    so the kernel's event queue never overflows)."""

    def __init__(self, directories: list[Path]):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.dirs = {}
        for directory in directories:
            wd = self.libc.inotify_add_watch(self.fd, str(directory).encode(), IN_OPEN)
            assert wd >= 0, (directory, os.strerror(ctypes.get_errno()))
            self.dirs[wd] = directory
        self.opened: set[Path] = set()
        self.overflowed = False
        self.stop = threading.Event()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            at = 0
            while at < len(data):
                wd, mask, _, length = struct.unpack_from("iIII", data, at)
                name = data[at + 16 : at + 16 + length].rstrip(b"\0").decode()
                at += 16 + length
                self.overflowed |= bool(mask & IN_Q_OVERFLOW)
                if mask & IN_OPEN and not mask & IN_ISDIR and wd in self.dirs:
                    self.opened.add(self.dirs[wd] / name)

    def _loop(self) -> None:
        while not self.stop.is_set():
            if select.select([self.fd], [], [], 0.05)[0]:
                self._drain()

    def __enter__(self):
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._drain()
        os.close(self.fd)


def covered(path: Path, declared: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in declared)


@pytest.mark.slow
def test_each_stage_opens_exactly_its_declared_inputs(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["experiment=tiny", f"run_dir={run_dir}"]
    pipeline.config.register()  # the `base_config` schema that config.yaml's defaults list names
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    layout = RunDir.of(cfg, run_dir)
    run_pipeline("stage=data", *overrides)
    for name, spec in STAGES.items():
        if name == "data":
            continue  # the tiny data are generated; a data.path file is checked like any input below
        declared = [p.resolve() for p in spec.inputs(cfg, layout)]
        before = {p.resolve() for p in run_dir.rglob("*") if p.is_file()}
        directories = sorted({p for p in run_dir.resolve().rglob("*") if p.is_dir()} | {run_dir.resolve()})
        directories += [d for d in declared if d.is_dir() and not d.is_relative_to(run_dir.resolve())]
        with OpenWatch(directories) as watch:
            run_pipeline(f"stage={name}", *overrides)
        assert not watch.overflowed, f"{name}: inotify queue overflowed: the record is incomplete"
        opened = {p.resolve() for p in watch.opened} & before  # what the stage made is its output
        opened = {p for p in opened if not str(p.relative_to(run_dir.resolve())).startswith(RUNNER_FILES)}
        undeclared = sorted(str(p.relative_to(run_dir.resolve())) for p in opened if not covered(p, declared))
        assert not undeclared, f"stage {name} reads files its StageSpec does not declare: {undeclared}"
        unused = [str(d) for d in declared if not any(covered(p, [d]) for p in opened)]
        assert not unused, f"stage {name} declares inputs it never opens: {unused}"
