"""The stage table: for each stage, its module, the config keys that shape its outputs, and the files
it reads and writes (all paths from `pipeline.run.layout`). The manifest hashes exactly these inputs
and outputs, so a change to any of them reruns the stage; a test checks the inputs against the files
each stage really opens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from pipeline.run.layout import OUTTYPES, RunDir


@dataclass(frozen=True)
class StageSpec:
    # pipeline/stages/<name>.py, which has run(cfg, run_dir) -> metrics. Named, not imported: it is
    # imported when the stage runs, so `stage=data` never loads torch, transformers or trl.
    module: str
    config_keys: tuple[str, ...]  # the config keys (groups or dotted keys) that shape its outputs
    inputs: Callable[[DictConfig, RunDir], list[Path]]
    outputs: Callable[[DictConfig, RunDir], list[Path]]
    always_run: bool = False


def _local(path) -> list[Path]:
    """A user-given local file or directory (a hub id is pinned by its revision in the config)."""
    return [Path(path)] if path and Path(path).exists() else []


def data_inputs(cfg, run: RunDir) -> list[Path]:
    return _local(cfg.data.path)


def train_inputs(cfg, run: RunDir) -> list[Path]:
    base = [] if cfg.model.tiny is not None else _local(cfg.model.name_or_path)
    return [run.train_rows, run.eval_rows, *_local(cfg.model.tokenizer_path), *base]


def train_outputs(cfg, run: RunDir) -> list[Path]:
    return [run.adapter, run.metrics("train"), *([run.base] if cfg.model.tiny is not None else [])]


def merge_inputs(cfg, run: RunDir) -> list[Path]:
    base = [run.base] if cfg.model.tiny is not None else _local(cfg.model.name_or_path)
    # metrics/train.json: the model card quotes the training figures.
    return [run.adapter, *base, run.eval_rows, run.metrics("train")]


def convert_inputs(cfg, run: RunDir) -> list[Path]:
    return [run.merged]


def quantize_inputs(cfg, run: RunDir) -> list[Path]:
    # merged/: the tokenizer (GGUF check, calibration text); train rows: the importance matrix.
    imatrix = [run.train_rows] if cfg.export.imatrix.types else []
    return [run.converted_gguf(cfg.export.outtype), run.merged, *imatrix]


def quantize_outputs(cfg, run: RunDir) -> list[Path]:
    made = [q for q in cfg.export.quants if q != OUTTYPES[cfg.export.outtype]]  # the converter made that one
    files = [run.gguf(q) for q in cfg.export.quants] + [run.modelfile(q) for q in made]
    return files + ([run.imatrix] if cfg.export.imatrix.types else [])


def ladder_inputs(cfg, run: RunDir) -> list[Path]:
    base = [run.base] if cfg.model.tiny is not None else _local(cfg.model.name_or_path)
    ggufs = [run.converted_gguf(cfg.export.outtype), *(run.gguf(q) for q in cfg.export.quants)]
    imatrix = [run.imatrix] if cfg.export.imatrix.types else []  # to make the other variant
    return [run.adapter, *base, run.merged, *dict.fromkeys(ggufs), *imatrix, run.eval_rows]


def smoke_artifacts(cfg, run: RunDir) -> tuple[Path, list[Path]]:
    """(merged HF dir, GGUFs) to check: the run's, or those smoke.hf_dir / smoke.gguf name."""
    hf_dir = Path(cfg.smoke.hf_dir) if cfg.smoke.hf_dir else run.merged
    return hf_dir, [Path(p) for p in cfg.smoke.gguf] or [run.gguf(q) for q in cfg.export.quants]


def smoke_inputs(cfg, run: RunDir) -> list[Path]:
    hf_dir, ggufs = smoke_artifacts(cfg, run)
    ladder = [run.metrics("ladder")] if run.metrics("ladder").is_file() else []  # quoted in the report
    return [hf_dir, *ggufs, run.eval_rows, *ladder]


# The GGUF file names: <export.name or model.name-data.name>-<TYPE>.gguf.
GGUF_NAME_KEYS = ("export.name", "model.name", "data.name")

STAGES: dict[str, StageSpec] = {
    "data": StageSpec("pipeline.stages.data", ("data",), data_inputs, lambda cfg, run: [run.data]),
    "train": StageSpec("pipeline.stages.train", ("model", "train"), train_inputs, train_outputs),
    "merge": StageSpec(
        "pipeline.stages.merge",
        # data.*: the model card names the dataset.
        ("model", "train", "merge", "data.name", "data.hub_id", "data.path"),
        merge_inputs,
        lambda cfg, run: [run.merged, run.metrics("merge")],
    ),
    "convert": StageSpec(
        "pipeline.stages.convert",
        ("export.outtype", "llamacpp", *GGUF_NAME_KEYS),
        convert_inputs,
        lambda cfg, run: [
            run.converted_gguf(cfg.export.outtype),
            run.modelfile(OUTTYPES[cfg.export.outtype]),
        ],
    ),
    "quantize": StageSpec(
        "pipeline.stages.quantize",
        ("export.outtype", "export.quants", "export.imatrix", "llamacpp", *GGUF_NAME_KEYS),
        quantize_inputs,
        quantize_outputs,
    ),
    # 4-bit loading (train.quantization, model) and the eval sequences' length limit shape its figures.
    "ladder": StageSpec(
        "pipeline.stages.ladder",
        ("export", "llamacpp", "model", "train.quantization", "train.max_length", *GGUF_NAME_KEYS),
        ladder_inputs,
        lambda cfg, run: [run.metrics("ladder"), run.gguf_dir / "README.md"],
    ),
    # Always reruns: it checks live engines, whose behaviour is not an input the manifest hashes.
    "smoke": StageSpec(
        "pipeline.stages.smoke",
        ("smoke", "export", "llamacpp"),
        smoke_inputs,
        lambda cfg, run: [run.smoke_report],
        True,
    ),
}
