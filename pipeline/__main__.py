"""`python -m pipeline stage=<name>`: run one stage, or every stage in order with `stage=all`.

Each stage reads its inputs from `run_dir` and writes its outputs there, then records them in
`run_dir/manifest.json`. A stage whose inputs and config are unchanged since it last finished is
skipped; `force=true` reruns it.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.config import check_settings, register
from pipeline.machine import diskspace
from pipeline.machine.memory import StagePeak, release_freed_memory
from pipeline.run.errors import PipelineError
from pipeline.run.layout import RunDir
from pipeline.run.runlock import hold_run_dir
from pipeline.run.summary import print_summary
from pipeline.stages import STAGES

log = logging.getLogger("pipeline")


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig | ListConfig) else node


def run_stage(name: str, cfg: DictConfig, run_dir: Path) -> float | None:
    """Run one stage; its wall-clock seconds, or None when it was skipped (or not this rank's)."""
    from pipeline.run.manifest import Manifest

    spec = STAGES[name]
    layout = RunDir.of(cfg, run_dir)
    # Under `accelerate launch` every rank runs this; only training is distributed, and only the
    # main rank (RANK 0) runs the other stages and writes the manifest.
    is_main = int(os.environ.get("RANK", "0")) == 0
    if not is_main and name != "train":
        return None
    if name == "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from pipeline.machine.processes import process_state

        process_state().wait_for_everyone()  # rank 0 may still be writing the data stage's output
    stage_config = {key: _plain(OmegaConf.select(cfg, key)) for key in spec.config_keys}
    manifest = Manifest(run_dir)
    if (
        not cfg.force
        and not spec.always_run
        and manifest.is_fresh(name, spec.inputs(cfg, layout), stage_config)
    ):
        log.info(
            "stage %s: inputs and config unchanged since it last ran, skipped (force=true reruns it)", name
        )
        return None
    log.info("stage %s: running", name)
    diskspace.checked_write = None  # each stage names its own writes
    # stage=all runs every stage in this process: what the last one freed goes back to the kernel
    # first, so this stage's peak is its own (not the train stage's heap, kept by glibc for reuse).
    release_freed_memory()
    started = time.monotonic()
    with StagePeak() as peak:
        metrics = importlib.import_module(spec.module).run(cfg, run_dir)
    seconds, memory = round(time.monotonic() - started, 2), peak.figures()
    if not is_main:
        return None
    manifest = Manifest(run_dir)  # the stage may have been long; re-read before writing
    manifest.record(
        name,
        outputs=spec.outputs(cfg, layout),
        inputs=spec.inputs(cfg, layout),
        stage_config=stage_config,
        full_config=OmegaConf.to_container(cfg, resolve=True),
        metrics=metrics,
        seconds=seconds,
        memory=memory,
    )
    log.info("stage %s: done in %.1f s, peak RSS %.0f MB", name, seconds, memory["peak_total_rss_mb"])
    return seconds


register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    # SIGTERM (kill, timeout, CI cancellation) unwinds like Ctrl-C, so `finally` blocks stop the
    # servers a stage started and temporary artifacts are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    run_dir = Path(cfg.run_dir)
    names = list(STAGES) if cfg.stage == "all" else [cfg.stage.value]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        sys.exit(f"stage={unknown[0]} is not implemented yet; available: {', '.join(STAGES)} or all")
    if cfg.model.trust_remote_code:
        warn_remote_code(cfg)
    times = {}
    try:
        if int(os.environ.get("RANK", "0")) == 0:  # one lock per run, not one per rank
            hold_run_dir(run_dir)  # already held when run_dir= was given (see __main__ below)
        check_settings(cfg)
        for name in names:
            times[name] = run_stage(name, cfg, run_dir)
    except PipelineError as err:  # the project's own: one line that names the file or key
        log.error("%s: %s", type(err).__name__, err)  # into run_dir's log
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            log.exception("stage failed with an unexpected error; traceback follows")
            raise
        # The disk filled up mid-write: artifacts are written to temporaries and renamed (pipeline.run.io),
        # and the manifest is recorded only after a stage ends, so nothing final is half-written.
        where = Path(err.filename) if err.filename else run_dir
        free = shutil.disk_usage(next(p for p in (where, *where.parents) if p.exists())).free
        needed = diskspace.checked_write
        message = (
            f"{where}: no space left on the device ({free / 1e6:.1f} MB free there now"
            + (f"; the stage needs about {needed[1] / 1e6:.1f} MB for {needed[0]}" if needed else "")
            + "); nothing was written under a final name: free some space and rerun"
        )
        log.error("%s", message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    except Exception:
        # Anything else (CUDA out of memory, NCCL, a library's error, a bug) keeps its whole
        # traceback: into run_dir's log here, and on stderr when it propagates (exit 1).
        log.exception("stage failed with an unexpected error; traceback follows")
        raise
    if int(os.environ.get("RANK", "0")) == 0:
        print_summary(run_dir, times)


def warn_remote_code(cfg: DictConfig) -> None:
    """model.trust_remote_code=true runs Python that comes with the model: say whose, and which files."""
    import json

    source = cfg.model.name_or_path or "the tiny base (model=tiny)"
    config_file = Path(str(cfg.model.name_or_path or "")) / "config.json"
    auto_map = json.loads(config_file.read_text()).get("auto_map") if config_file.is_file() else None
    modules = sorted({str(v).split(".")[0] + ".py" for v in (auto_map or {}).values()})
    what = ", ".join(modules) if modules else "the modules its config.json names in auto_map"
    message = (
        f"model.trust_remote_code=true: transformers will execute Python code from {source}"
        f"{'@' + cfg.model.revision if cfg.model.revision else ''} ({what}) in train, merge and convert"
    )
    log.warning(message)
    print(f"warning: {message}", file=sys.stderr)


def check_run_dir_argument(overrides: list[str]) -> None:
    """Hydra opens `run_dir/__main__.log` and writes `run_dir/.hydra` before `main` runs, so a run_dir
    that is a file or cannot be written to would end in Hydra's traceback: say it in one line first."""
    value = next((arg.split("=", 1)[1] for arg in overrides if arg.lstrip("+").startswith("run_dir=")), None)
    if value is None:
        return  # the default: a new timestamped directory under outputs/
    run_dir = Path(value)
    if run_dir.exists() and not run_dir.is_dir():
        sys.exit(f"error: run_dir={run_dir}: exists and is not a directory")
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):  # a write probe, removed at once
            pass
    except OSError as err:
        sys.exit(f"error: run_dir={run_dir}: cannot write to {existing}: {err.strerror}")
    # Before Hydra writes run_dir/.hydra and opens its log: a second run on a busy dir touches nothing.
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            hold_run_dir(run_dir)
        except PipelineError as err:
            sys.exit(f"error: {err}")


if __name__ == "__main__":
    check_run_dir_argument(sys.argv[1:])
    main()
