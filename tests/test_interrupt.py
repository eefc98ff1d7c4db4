"""A run killed (SIGKILL or SIGTERM) at a random moment inside merge, convert, quantize or ladder:
nothing half-written under a final name, no child left running, and a rerun of `stage=all` that
skips exactly the stages that had finished and reruns the interrupted one."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, run_pipeline

from pipeline.engines.gguf import check_gguf_loads
from pipeline.run.io import check_safetensors
from pipeline.stages import STAGES

# The long set (`pytest -m long`, a second command .ci/run also runs): see pyproject.toml.
pytestmark = pytest.mark.long

SKIPPED = "inputs and config unchanged since it last ran, skipped"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# (stage, what marks the moment: a child whose command line holds this, or None for the stage's
# "running" log line), then a random delay after it. Fixed seed, so a failure reproduces.
MOMENTS = [
    ("merge", None),
    ("convert", "convert_hf_to_gguf.py"),
    ("quantize", "llama-imatrix"),
    ("quantize", "llama-quantize"),
    ("ladder", None),
]
CASES = [(stage, marker, sig) for stage, marker in MOMENTS for sig in (signal.SIGKILL, signal.SIGTERM)]
RNG = random.Random(20)
DELAYS = [RNG.uniform(0.0, 0.6) for _ in CASES]


def case_id(case) -> str:
    stage, marker, sig = case
    return f"{stage}-{marker or 'log'}-{sig.name}"


def forget(run_dir: Path, stage: str) -> None:
    """Drop `stage` from the manifest, so the next run redoes it over its (complete) old artifacts."""
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["stages"].pop(stage)
    path.write_text(json.dumps(manifest, indent=2))


def finished(run_dir: Path, stage: str) -> bool:
    return stage in json.loads((run_dir / "manifest.json").read_text())["stages"]


def wait_for_moment(pipeline: subprocess.Popen, run_dir: Path, stage: str, marker: str | None) -> None:
    log = run_dir / "__main__.log"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and pipeline.poll() is None:
        if marker is None:
            if log.is_file() and f"stage {stage}: running" in log.read_text(errors="replace"):
                return
        elif any(marker in command_line(c) for c in descendants(pipeline)):
            return
        time.sleep(0.02)
    raise AssertionError(f"never reached {marker or 'the log line'} of stage {stage}")


def descendants(pipeline: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(pipeline.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def command_line(process: psutil.Process) -> str:
    """Its command line, or "" for a child that exited while we looked (llama-quantize takes ~1 s)."""
    try:
        return " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def final_artifacts(run_dir: Path) -> list[Path]:
    """Files under their final names: no part of the path is a dot-named temporary."""
    return [
        p
        for p in run_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(run_dir).parts)
    ]


def check_complete(path: Path) -> None:
    if path.suffix == ".safetensors":
        check_safetensors(path)
    elif path.name.endswith(".imatrix.gguf"):  # an importance matrix, not a model: read it whole
        check_imatrix(path)
    elif path.suffix == ".gguf":
        check_gguf_loads(path)
    elif path.suffix == ".json":
        json.loads(path.read_text(encoding="utf-8"))
    elif path.name.endswith((".Modelfile", "README.md")):
        assert path.stat().st_size > 0, f"{path} is empty"


def check_imatrix(path: Path) -> None:
    """llama.cpp's own gguf-py reads the importance matrix whole: every tensor within the file."""
    from pipeline.engines.llamacpp import LlamaCpp

    sys.path.insert(0, str(LlamaCpp().converter().parent / "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(path)
    assert reader.tensors, f"{path}: no tensors"
    for tensor in reader.tensors:
        assert tensor.data.size == tensor.n_elements, f"{path}: {tensor.name} cut short"


def temporaries(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_a_killed_stage_leaves_whole_artifacts_no_children_and_a_rerun_that_resumes(case, tiny_run, tmp_path):
    stage, marker, sig = case
    delay = DELAYS[CASES.index(case)]
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    forget(run_dir, stage)
    (run_dir / "__main__.log").unlink(missing_ok=True)
    command = [sys.executable, "-m", "pipeline", "stage=all", "experiment=tiny", f"run_dir={run_dir}"]
    pipeline = subprocess.Popen(
        command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    children: list[psutil.Process] = []
    try:
        wait_for_moment(pipeline, run_dir, stage, marker)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:  # every child seen before the kill is tracked
            children += [c for c in descendants(pipeline) if c not in children]
            time.sleep(0.01)
        children += [c for c in descendants(pipeline) if c not in children]
        pipeline.send_signal(sig)
        pipeline.wait(timeout=60)
    finally:
        if pipeline.poll() is None:
            pipeline.kill()
    # PR_SET_PDEATHSIG sends the children SIGTERM the moment the pipeline dies.
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        child.kill()
    assert not alive, f"outlived the pipeline: {[c.pid for c in alive]}"

    for path in final_artifacts(run_dir):
        check_complete(path)

    done = {name for name in STAGES if finished(run_dir, name)}
    rerun = run_pipeline("stage=all", "experiment=tiny", f"run_dir={run_dir}")
    log = rerun.stdout + rerun.stderr
    skipped = {name for name in STAGES if f"stage {name}: {SKIPPED}" in log}
    before = set(list(STAGES)[: list(STAGES).index(stage)])
    assert before <= skipped, f"finished stages rerun: {before - skipped}"
    assert (stage in skipped) == (stage in done), (
        f"stage {stage} finished={stage in done}, log:\n{log[-3000:]}"
    )
    assert stage in done or f"stage {stage}: running" in log
    for path in final_artifacts(run_dir):
        check_complete(path)
    assert not temporaries(run_dir), f"temporaries left after the rerun: {temporaries(run_dir)}"
