"""`python -m pipeline stage=<name>`: run one stage, or every stage in order with `stage=all`.

Each stage reads its inputs from `run_dir` and writes its outputs there, then records them in
`run_dir/manifest.json`. A stage whose inputs and config are unchanged since it last finished is
skipped; `force=true` reruns it.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.config import check_settings, register
from pipeline.convert import OUTTYPES

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class StageSpec:
    module: str  # has run(cfg, run_dir) -> metrics
    config_keys: tuple[str, ...]  # the config keys (groups or dotted keys) that shape its outputs
    inputs: Callable[[DictConfig, Path], list[Path]]
    outputs: Callable[[DictConfig, Path], list[Path]]
    always_run: bool = False


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig | ListConfig) else node


def _gguf(cfg, run_dir, type_name):
    from pipeline.convert import gguf_path

    return gguf_path(cfg, run_dir, type_name)


def _data_inputs(cfg, run_dir):
    return [Path(cfg.data.path)] if cfg.data.path else []


def _train_outputs(cfg, run_dir):
    outputs = [run_dir / "adapter", run_dir / "metrics" / "train.json"]
    return outputs + ([run_dir / "base"] if cfg.model.tiny is not None else [])


STAGES: dict[str, StageSpec] = {
    "data": StageSpec("pipeline.data", ("data",), _data_inputs, lambda cfg, d: [d / "data"]),
    "train": StageSpec(
        "pipeline.train",
        ("model", "train"),
        lambda cfg, d: [d / "data" / "train.jsonl", d / "data" / "eval.jsonl"],
        _train_outputs,
    ),
    "merge": StageSpec(
        "pipeline.merge",
        ("model", "train", "merge"),
        lambda cfg, d: [d / "adapter", d / "data" / "eval.jsonl"],
        lambda cfg, d: [d / "merged", d / "metrics" / "merge.json"],
    ),
    "convert": StageSpec(
        "pipeline.convert",
        ("export.name", "export.outtype", "export.ladder_rows", "export.min_top1_agreement", "llamacpp"),
        lambda cfg, d: [d / "merged"],
        lambda cfg, d: [_gguf(cfg, d, OUTTYPES[cfg.export.outtype])],
    ),
    "quantize": StageSpec(
        "pipeline.quantize",
        ("export", "llamacpp"),
        lambda cfg, d: [_gguf(cfg, d, OUTTYPES[cfg.export.outtype])],
        lambda cfg, d: [_gguf(cfg, d, q) for q in cfg.export.quants],
    ),
    # Always reruns: it checks live engines, whose behaviour is not an input the manifest hashes.
    "smoke": StageSpec("pipeline.smoke", (), lambda cfg, d: [], lambda cfg, d: [d / "smoke" / "report.json"],
                       always_run=True),  # fmt: skip
}


def run_stage(name: str, cfg: DictConfig, run_dir: Path) -> float | None:
    """Run one stage; its wall-clock seconds, or None when it was skipped (or not this rank's)."""
    from pipeline.manifest import Manifest

    spec = STAGES[name]
    # Under `accelerate launch` every rank runs this; only training is distributed, and only the
    # main rank (RANK 0) runs the other stages and writes the manifest.
    is_main = int(os.environ.get("RANK", "0")) == 0
    if not is_main and name != "train":
        return None
    if name == "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from pipeline.train import process_state

        process_state().wait_for_everyone()  # rank 0 may still be writing the data stage's output
    stage_config = {key: _plain(OmegaConf.select(cfg, key)) for key in spec.config_keys}
    manifest = Manifest(run_dir)
    if not cfg.force and not spec.always_run and manifest.is_fresh(name, spec.inputs(cfg, run_dir), stage_config):
        log.info("stage %s: inputs and config unchanged since it last ran, skipped (force=true reruns it)", name)
        return None
    log.info("stage %s: running", name)
    started = time.monotonic()
    metrics = importlib.import_module(spec.module).run(cfg, run_dir)
    seconds = round(time.monotonic() - started, 2)
    if not is_main:
        return None
    manifest = Manifest(run_dir)  # the stage may have been long; re-read before writing
    manifest.record(
        name,
        outputs=spec.outputs(cfg, run_dir),
        inputs=spec.inputs(cfg, run_dir),
        stage_config=stage_config,
        full_config=OmegaConf.to_container(cfg, resolve=True),
        metrics=metrics,
        seconds=seconds,
    )
    log.info("stage %s: done in %.1f s", name, seconds)
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
        check_settings(cfg)
        for name in names:
            times[name] = run_stage(name, cfg, run_dir)
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as err:
        log.error("%s: %s", type(err).__name__, err)  # into run_dir's log
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
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


def print_summary(run_dir: Path, times: dict[str, float | None]) -> None:
    from pipeline.ladder import format_table, ladder_table
    from pipeline.manifest import Manifest

    if int(os.environ.get("RANK", "0")) != 0:
        return
    spent = ", ".join(f"{name} {'skipped' if s is None else f'{s:.1f} s'}" for name, s in times.items())
    print(f"\nStage times ({run_dir}): {spent}; total {sum(s or 0 for s in times.values()):.1f} s")
    rows = ladder_table(Manifest(run_dir).data)
    if rows:
        print(f"\nFidelity ladder ({run_dir}, eval set, assistant tokens):\n{format_table(rows)}")


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


if __name__ == "__main__":
    check_run_dir_argument(sys.argv[1:])
    main()
