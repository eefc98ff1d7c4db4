"""Progress and the run summary: bars on stderr when it is a terminal (a pty here), nothing of them
when it is not (a pipe, as in CI and logs); one summary of the run on stdout either way."""

from __future__ import annotations

import fcntl
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios

import pytest
from conftest import ROOT, WITHOUT_VLLM, copy_run, run_pipeline


def copy_for_quantize(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    for part in ("data", "merged", "gguf", "manifest.json"):
        source = tiny_run / part
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, run_dir / part)
    return run_dir


def run_on_a_terminal(*overrides: str) -> tuple[int, str, str]:
    """`python -m pipeline` with stderr on a pseudo-terminal of 120 columns; (exit, stdout, stderr)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *overrides],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=slave,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        err += chunk
    out = process.stdout.read().decode()
    os.close(master)
    return process.wait(), out, err.decode(errors="replace")


@pytest.mark.slow
def test_quantize_shows_progress_on_a_terminal_only(tiny_run, tmp_path):
    run_dir = copy_for_quantize(tiny_run, tmp_path)
    overrides = ("stage=quantize", "experiment=tiny", f"run_dir={run_dir}", "force=true")
    code, out, err = run_on_a_terminal(*overrides)
    assert code == 0, err[-2000:]
    assert "quantize: 100%" in err and "type" in err, err[-2000:]
    assert "Run summary" in out and "Fidelity ladder" in out

    piped = run_pipeline(*overrides)
    assert "quantize: " not in piped.stderr and "%|" not in piped.stderr, piped.stderr[-2000:]
    assert "Run summary" in piped.stdout


@pytest.mark.slow
def test_the_run_summary_has_stages_artifacts_engines_and_ladder(tiny_run, tmp_path):
    """The tiny run's own summary, on a copy (smoke reruns, and its report must stay the shared run's;
    every other stage is fresh and skipped)."""
    run_dir = copy_run(tiny_run, tmp_path)
    result = run_pipeline("stage=all", "experiment=tiny", f"run_dir={run_dir}", WITHOUT_VLLM)
    out = result.stdout[result.stdout.index("Run summary") :]
    for stage in ("data", "train", "merge", "convert", "quantize", "smoke"):
        assert f"\n{stage} " in out, stage
    assert "skipped" in out  # unchanged stages are skipped, and say so
    assert "gguf/" in out and "-Q4_K_M.gguf" in out and " MB" in out
    for engine in ("transformers", "llama-server", "vLLM", "TGI live"):
        assert engine in out, engine
    assert "Fidelity ladder" in out
