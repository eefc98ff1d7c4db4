"""The Hydra config: the composed defaults are the QLoRA Guanaco-7B recipe, `experiment=tiny` is
CPU-safe, the library kwargs build the real library config objects, and bad overrides fail through
the real CLI with Hydra's message."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, run_pipeline
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import pipeline.config


def compose_cfg(*overrides: str) -> DictConfig:
    """Compose `conf/config.yaml` as `python -m pipeline` would, without running anything."""
    pipeline.config.register()  # the `base_config` schema that config.yaml's defaults list names
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def default_cfg() -> DictConfig:
    return compose_cfg()


@pytest.fixture(scope="module")
def tiny_cfg() -> DictConfig:
    return compose_cfg("experiment=tiny")


def test_defaults_are_the_qlora_guanaco_7b_recipe(default_cfg):
    cfg = default_cfg
    assert cfg.stage == "all" and cfg.force is False
    assert cfg.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    assert cfg.model.tiny is None
    assert cfg.data.hub_id == "timdettmers/openassistant-guanaco"
    assert cfg.data.path is None and cfg.data.synthetic is None

    assert OmegaConf.to_container(cfg.train.lora) == {
        "r": 64,
        "lora_alpha": 16,
        "lora_dropout": 0.1,
        "target_modules": "all-linear",
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    assert OmegaConf.to_container(cfg.train.quantization) == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
    }

    sft = cfg.train.sft
    assert sft.learning_rate == pytest.approx(2e-4)
    assert sft.lr_scheduler_type == "constant"
    assert sft.max_grad_norm == pytest.approx(0.3)
    assert sft.optim == "paged_adamw_32bit"
    # The paper's 16 sequences per optimizer step; how they are split is chosen per device.
    assert cfg.train.batch_size == 16
    assert cfg.train.micro_batch_size == "auto" and cfg.train.gradient_checkpointing == "auto"
    assert sft.padding_free is True and sft.packing is False
    assert sft.train_sampling_strategy == "group_by_length"
    assert sft.max_steps == 1875
    assert sft.seed == 0
    assert sft.bf16 is True
    assert cfg.train.max_length == 512


def test_tiny_experiment_is_cpu_safe(tiny_cfg):
    cfg = tiny_cfg
    assert cfg.model.name == "tiny" and cfg.model.name_or_path is None
    assert cfg.model.tiny.num_hidden_layers == 2 and cfg.model.tiny.hidden_size == 256
    assert cfg.data.name == "synthetic" and cfg.data.hub_id is None
    assert cfg.data.synthetic.train_rows > 0 and cfg.data.synthetic.eval_rows > 0
    # CPUs have no bf16 matmuls worth using and no paged optimizers
    assert cfg.train.quantization.bnb_4bit_compute_dtype == "float32"
    assert cfg.train.sft.optim == "adamw_torch"
    assert cfg.train.sft.bf16 is False
    assert cfg.train.micro_batch_size == "auto" and cfg.train.batch_size == 16
    # the experiment overrides single keys: the rest of the recipe is still merged in
    assert cfg.train.quantization.bnb_4bit_quant_type == "nf4"
    assert cfg.train.lora.r == 64


def test_experiment_leaves_default_untouched(default_cfg, tiny_cfg):
    # composing experiment=tiny must not leak into a later default composition
    again = compose_cfg()
    assert OmegaConf.to_container(again) == OmegaConf.to_container(default_cfg)
    assert again.train.sft.optim != tiny_cfg.train.sft.optim


def _bf16_usable() -> bool:
    from transformers.utils import is_torch_bf16_gpu_available

    return is_torch_bf16_gpu_available()


@pytest.mark.parametrize("experiment", [None, "tiny"])
def test_library_configs_build(experiment, tmp_path):
    """Every key under train.sft/lora/quantization is one the library accepts (a typo is a TypeError)."""
    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    cfg = compose_cfg(*([f"experiment={experiment}"] if experiment else []))
    sft = OmegaConf.to_container(cfg.train.sft, resolve=True)
    # The default recipe asks for bf16, which transformers refuses without a bf16 GPU unless use_cpu
    # is set; use_cpu changes nothing about which keys are accepted.
    extra = {} if _bf16_usable() or not sft.get("bf16") else {"use_cpu": True}
    # max_length as pipeline/stages/train.py passes it: a duplicate key in train.sft would fail there too.
    args = SFTConfig(output_dir=str(tmp_path), max_length=cfg.train.max_length, **extra, **sft)
    assert args.learning_rate == pytest.approx(sft["learning_rate"])
    assert args.max_steps == sft["max_steps"]
    assert args.optim.value == sft["optim"]
    assert args.max_length == cfg.train.max_length

    lora = LoraConfig(**OmegaConf.to_container(cfg.train.lora, resolve=True))
    assert lora.r == 64 and lora.target_modules == "all-linear"

    bnb = BitsAndBytesConfig(**OmegaConf.to_container(cfg.train.quantization, resolve=True))
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    expected_dtype = torch.float32 if experiment == "tiny" else torch.bfloat16
    assert bnb.bnb_4bit_compute_dtype == expected_dtype


def test_sft_config_rejects_an_unknown_key(tmp_path):
    # the check above is only meaningful if SFTConfig really refuses unknown keys
    from trl import SFTConfig

    with pytest.raises(TypeError, match="not_a_key"):
        SFTConfig(output_dir=str(tmp_path), use_cpu=True, not_a_key=1)


def test_compose_rejects_unknown_key_in_schema():
    # train.* is a typed dataclass: composition itself refuses a misspelt key
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_cfg("train.max_lenght=10")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.not_a_key=1", ["Key 'not_a_key' not in 'TrainConfig'", "full_key: train.not_a_key"]),
        ("train.max_length=abc", ["'abc'", "converted to Integer", "full_key: train.max_length"]),
        ("model=nope", ["Could not find 'model/nope'", "llama2_7b", "tiny"]),
        ("stage=nope", ["Invalid value 'nope'", "expected one of", "data", "full_key: stage"]),
    ],
)
def test_cli_rejects_bad_override(override, expected, tmp_path: Path):
    run_dir = tmp_path / "run"
    # stage=data first so that, were the override accepted, only the cheap data stage could run
    overrides = [o for o in ("stage=data",) if not override.startswith("stage=")]
    result = run_pipeline(*overrides, "experiment=tiny", override, f"run_dir={run_dir}", check=False)
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr, f"{text!r} not in stderr:\n{result.stderr}"
    assert not (run_dir / "data").exists()  # nothing ran


def test_every_stage_in_the_stage_table_can_be_named_on_the_command_line():
    from pipeline.config import Stage
    from pipeline.stages import STAGES

    assert [s.value for s in Stage] == [*STAGES, "all"]


# ---------------------------------------------------------------------------------------------------
# How a step executes (pipeline/machine/step_plan.py): the planner against device sizes, at Llama-2-7B's shape


def plan_for(size_gb: float, *overrides: str, ranks: int = 1) -> dict:
    from pipeline.machine.step_plan import LLAMA2_7B_SHAPES, plan_step

    return plan_step(compose_cfg(*overrides), LLAMA2_7B_SHAPES, ranks, memory=(int(size_gb * 1e9), "test"))


def test_the_plan_keeps_16_sequences_per_step_and_takes_the_largest_micro_batch_that_fits():
    from pipeline.machine.memory import PROCESS_BYTES, train_needs
    from pipeline.machine.step_plan import LLAMA2_7B_SHAPES

    cfg = compose_cfg()
    plans = {size: plan_for(size) for size in (16, 24, 40, 80, 200)}
    for size, plan in plans.items():
        assert plan["micro_batch_size"] * plan["gradient_accumulation_steps"] == 16, size
        assert plan["estimated_peak_bytes"] <= size * 1e9, size
        assert not plan["gradient_checkpointing"], size  # each fits micro-batch 1 without it
        bigger = plan["micro_batch_size"] * 2
        if bigger <= 16:  # the next divisor up would not have fit
            need = max(train_needs(LLAMA2_7B_SHAPES, cfg, bigger, False).values()) + PROCESS_BYTES
            assert need > size * 1e9, size
    micro = [plans[size]["micro_batch_size"] for size in sorted(plans)]
    assert micro == sorted(micro) and micro[0] < micro[-1] == 16


def test_checkpointing_comes_on_only_when_no_micro_batch_fits_without_it():
    from pipeline.machine.memory import NoMemory

    lean = plan_for(9)
    assert lean["gradient_checkpointing"] and lean["micro_batch_size"] >= 1
    assert "gradient checkpointing on: without it even micro-batch 1 would need" in lean["why"]
    with pytest.raises(
        NoMemory, match=r"^stage train needs about .* \(micro-batch 1, gradient checkpointing on:"
    ):
        plan_for(5)


def test_explicit_settings_and_the_lean_recipe_are_taken_as_given():
    lean = plan_for(80, "train=qlora_lean")
    assert (lean["micro_batch_size"], lean["gradient_accumulation_steps"]) == (1, 16)
    assert lean["gradient_checkpointing"] and "set by train.micro_batch_size" in lean["why"]
    assert compose_cfg("train=qlora_lean").train.sft.optim == "paged_adamw_32bit"
    fixed = plan_for(80, "train.micro_batch_size=4", "train.gradient_checkpointing=false")
    assert (
        fixed["micro_batch_size"],
        fixed["gradient_accumulation_steps"],
        fixed["gradient_checkpointing"],
    ) == (
        4,
        4,
        False,
    )


def test_ranks_share_the_16_sequences():
    plan = plan_for(80, ranks=2)
    assert plan["ranks"] * plan["micro_batch_size"] * plan["gradient_accumulation_steps"] == 16
    from pipeline.run.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.batch_size=16: not divisible by the 3 processes"):
        plan_for(80, ranks=3)
    with pytest.raises(
        ConfigError, match=r"train.micro_batch_size=16: expected a divisor of the 8 sequences"
    ):
        plan_for(80, "train.micro_batch_size=16", ranks=2)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.micro_batch_size=3", "train.micro_batch_size=3: expected a divisor of train.batch_size=16"),
        ("train.micro_batch_size=many", "train.micro_batch_size=many: expected auto or a positive number"),
        ("train.gradient_checkpointing=sometimes", "train.gradient_checkpointing=sometimes: expected auto"),
        ("train.attn_implementation=magic", "train.attn_implementation=magic: expected one of auto, sdpa"),
        (
            "+train.sft.per_device_train_batch_size=4",
            "train.sft.per_device_train_batch_size: set train.batch_size",
        ),
    ],
)
def test_step_settings_out_of_range_are_one_line(override, expected, tmp_path: Path):
    result = run_pipeline(
        "stage=data", "experiment=tiny", override, f"run_dir={tmp_path / 'run'}", check=False
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {expected}"), last
    assert not (tmp_path / "run" / "data").exists()


def test_the_fits_table_in_the_docs_is_what_the_estimate_prints():
    """docs/train_step.md quotes `python -m pipeline.machine.step_plan` for 16-80 GB GPUs."""
    import re
    import subprocess
    import sys

    tables = (ROOT / "docs" / "train_step.md").read_text()
    for overrides, column in (([], 1), (["train=qlora_lean"], 2)):
        out = subprocess.run(
            [sys.executable, "-m", "pipeline.machine.step_plan", *overrides],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout
        plans = re.findall(
            r"(\d+)GB: micro-batch (\d+) x (\d+), checkpointing (on|off), estimated ([\d.]+) GB", out
        )
        assert len(plans) == 4, out
        for size, micro, accumulation, checkpointing, gb in plans:
            ckpt = "checkpointing" if checkpointing == "on" else "no checkpointing"
            cell = f"{micro} x {accumulation}, {ckpt}, {gb} GB"
            rows = [line for line in tables.splitlines() if line.startswith(f"| {size} GB |")]
            assert rows and all(
                cell in row.split("|")[column + 1] or "same" in row.split("|")[column + 1] for row in rows
            ), (
                size,
                cell,
                rows,
            )
