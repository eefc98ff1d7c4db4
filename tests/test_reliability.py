"""Faults and refused settings: nothing lost, no child left behind, nothing sent off the machine."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, run_pipeline


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("override", "key"),
    [("+train.sft.no_such_field=1", "train.sft"), ("+train.lora.no_such_field=1", "train.lora")],
)
def test_a_refused_library_field_keeps_the_checkpoints(override, key, tmp_path):
    run_dir = tmp_path / "run"
    run_pipeline("stage=data", "experiment=tiny", f"run_dir={run_dir}")
    checkpoint = run_dir / "checkpoints" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    result = run_pipeline("stage=train", "experiment=tiny", f"run_dir={run_dir}", override, check=False)
    assert result.returncode != 0
    assert last_line(result.stderr).startswith(f"error: {key}: "), result.stderr[-2000:]
    assert "no_such_field" in last_line(result.stderr)
    assert "Traceback" not in result.stderr
    assert (checkpoint / "trainer_state.json").is_file(), "the run's checkpoints were deleted"


@pytest.mark.parametrize(("setting", "disabled"), [(None, True), ("0", False), ("1", True)])
def test_hub_telemetry_is_off_unless_the_user_opts_in(setting, disabled):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_TELEMETRY", "HF_HUB_OFFLINE")}
    if setting is not None:
        env["HF_HUB_DISABLE_TELEMETRY"] = setting
    code = "import pipeline, huggingface_hub.constants as c; print(c.HF_HUB_DISABLE_TELEMETRY)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(disabled)


@pytest.mark.slow
def test_the_converter_dies_with_a_killed_pipeline(tiny_run, tmp_path):
    """SIGKILL of `python -m pipeline stage=convert` takes llama.cpp's converter with it."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run / "merged", run_dir / "merged")
    shutil.copytree(tiny_run / "data", run_dir / "data")
    command = [sys.executable, "-m", "pipeline", "stage=convert", "experiment=tiny", f"run_dir={run_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    pipeline = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        converter = None
        deadline = time.monotonic() + 120
        while converter is None and time.monotonic() < deadline and pipeline.poll() is None:
            children = psutil.Process(pipeline.pid).children(recursive=True)
            converter = next((c for c in children if "convert_hf_to_gguf.py" in " ".join(c.cmdline())), None)
            time.sleep(0.05)
        assert converter is not None, "the converter never started"
        pipeline.send_signal(signal.SIGKILL)
        pipeline.wait()
        # PR_SET_PDEATHSIG: SIGTERM at once. Left alone, it would go on for seconds (importing torch,
        # reading the shards, writing its temporary).
        gone, alive = psutil.wait_procs([converter], timeout=2)
        assert not alive, f"converter {converter.pid} outlived the pipeline"
    finally:
        if pipeline.poll() is None:
            pipeline.kill()
    assert not list(Path(run_dir / "gguf").glob("*.gguf")), "a GGUF was finished under its final name"
