"""Memory: a stage's measured peak, and the refusal before a stage that cannot fit loads anything."""

from __future__ import annotations

import subprocess
import sys

from conftest import run_pipeline

from pipeline.machine.memory import NoMemory, StagePeak, parse_size, phase_peaks, require_memory


def test_stage_peak_sees_this_process_and_its_children():
    with StagePeak() as peak:
        block = bytearray(300_000_000)  # touched: resident
        block[::4096] = b"x" * len(block[::4096])
        del block
        child = "b = bytearray(400_000_000); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(1.0)"
        subprocess.run([sys.executable, "-c", child], check=True)
    figures = peak.figures()
    assert figures["peak_rss_exact"] and figures["peak_rss_mb"] >= 300
    assert figures["peak_children_rss_mb"] >= 400


def test_phase_peaks_are_each_phases_own():
    """The merge's per-phase figures: a 300 MB buffer held in one phase counts there, not in the next."""
    import time

    with StagePeak():
        phase_peaks()
        block = bytearray(300_000_000)
        block[::4096] = b"x" * len(block[::4096])
        time.sleep(3 * StagePeak.INTERVAL)
        del block
        held = phase_peaks()
        time.sleep(3 * StagePeak.INTERVAL)
        rss, anon = phase_peaks()
    assert rss + 250 <= held[0] and anon + 250 <= held[1], (held, rss, anon)
    assert phase_peaks()[1] is None  # no stage running: anonymous memory is not sampled


def test_require_memory_names_the_largest_phase_and_both_figures():
    cfg = {"memory_limit": "2GB"}
    record = require_memory(cfg, "merge", {"a": 100_000_000, "b": 200_000_000})
    assert record["largest_phase"] == "b" and record["memory_from"] == "memory_limit=2GB"
    try:
        require_memory(cfg, "merge", {"the merged model": 3_000_000_000})
    except NoMemory as err:
        assert str(err).startswith("stage merge needs about 4.1 GB of memory (the merged model), 2.0 GB")
    else:
        raise AssertionError("4 GB was allowed under memory_limit=2GB")
    assert parse_size("16GiB", "memory_limit") == 16 * 2**30


def test_a_stage_that_cannot_fit_refuses_before_it_loads(tmp_path):
    run_pipeline("stage=data", "experiment=tiny", f"run_dir={tmp_path}")
    result = run_pipeline(
        "stage=train", "experiment=tiny", "memory_limit=200MB", f"run_dir={tmp_path}", check=False
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: stage train needs about ") and "memory_limit=200MB" in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "adapter").exists()
    bad = run_pipeline(
        "stage=data", "experiment=tiny", "memory_limit=lots", f"run_dir={tmp_path}", check=False
    )
    assert bad.returncode == 1 and "memory_limit='lots': expected a size like" in bad.stderr


def test_a_stage_in_a_memory_cgroup_records_its_limit_and_stays_under_it(tmp_path):
    """bench/full_scale.py runs the pipeline in a memory cgroup of --memory-limit: the kernel holds
    the process tree to it, and each stage records the limit it ran under beside its peak."""
    import json
    import os
    from pathlib import Path

    import pytest
    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from full_scale import cgroup_figures, make_memory_cgroup

    cgroup, version = make_memory_cgroup(3 * 10**9)
    if cgroup is None:
        pytest.skip(f"no memory cgroup here: {version}")
    try:
        command = [sys.executable, "-m", "pipeline", "stage=data", "experiment=tiny", f"run_dir={tmp_path}"]
        subprocess.run(
            command,
            cwd=ROOT,
            check=True,
            capture_output=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            preexec_fn=lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid())),
        )
        figures = cgroup_figures(cgroup, version)
    finally:
        cgroup.rmdir()
    memory = json.loads(Path(tmp_path / "manifest.json").read_text())["stages"]["data"]["memory"]
    assert 2900 < memory["cgroup_limit_mb"] <= 3000, memory
    assert memory["peak_total_rss_mb"] < memory["cgroup_limit_mb"]
    assert (
        figures["limit_gb"] == 3.0
        and 0 < figures["peak_usage_gb"] < 3.0
        and figures["oom_kills"] in (0, None)
    )
    unlimited = run_pipeline("stage=data", "experiment=tiny", f"run_dir={tmp_path / 'free'}")
    assert unlimited.returncode == 0
    free = json.loads((tmp_path / "free" / "manifest.json").read_text())["stages"]["data"]["memory"]
    assert free["cgroup_limit_mb"] is None
