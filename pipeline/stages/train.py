"""Train stage: QLoRA SFT with trl's SFTTrainer on a 4-bit NF4 base (bitsandbytes) with peft LoRA.

Reads `run_dir/data/`, writes `run_dir/adapter/` (adapter weights, adapter config, the tokenizer with
the chat template) and `run_dir/metrics/train.json`. Examples are encoded with
`pipeline.chat.format.encode_dialog_segments`, so training sees exactly Meta's token ids; the loss is on
assistant tokens and the EOS closing each assistant turn only.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf
from transformers import TrainerCallback

from pipeline.chat.examples import encode_rows
from pipeline.chat.rows import read_jsonl
from pipeline.machine.memory import tensor_shapes
from pipeline.machine.processes import process_state
from pipeline.machine.step_plan import attention_implementation, fused_lm_head, plan_step
from pipeline.models.load import base_weight_files, load_quantized_base
from pipeline.run.errors import ConfigError, MissingInput
from pipeline.run.io import atomic_dir, write_json
from pipeline.run.layout import RunDir

log = logging.getLogger(__name__)


def tokenizer_model_file(model_cfg) -> Path:
    """The SentencePiece file the project's tokenizer is built from (see pipeline.chat.tokenizer)."""
    if model_cfg.tokenizer_path:
        path = Path(model_cfg.tokenizer_path)
    elif Path(model_cfg.name_or_path).is_dir():
        path = Path(model_cfg.name_or_path) / "tokenizer.model"
    else:
        from huggingface_hub import hf_hub_download

        # Gated on the hub: needs HF_TOKEN in the environment (never in the config).
        path = Path(hf_hub_download(model_cfg.name_or_path, "tokenizer.model", revision=model_cfg.revision))
    if not path.is_file():
        raise MissingInput(f"model.tokenizer_path: no SentencePiece tokenizer.model at {path}")
    return path


def prepare_base(cfg, base_dir: Path, train_rows: list[dict]) -> tuple[str, Path]:
    """(base model path or hub id, tokenizer.model file). `model=tiny` builds the base in `base_dir`."""
    if cfg.model.tiny is None:
        return cfg.model.name_or_path, tokenizer_model_file(cfg.model)
    from pipeline.models.tiny import build_tiny_base

    tokenizer_path = cfg.model.tokenizer_path
    if tokenizer_path and not Path(tokenizer_path).is_file():
        raise MissingInput(f"model.tokenizer_path: no SentencePiece tokenizer.model at {tokenizer_path}")
    if not (base_dir / "config.json").is_file():
        build_tiny_base(cfg.model.tiny, cfg.model.tokenizer_path, train_rows, base_dir)
    # Absolute, so the adapter's base_model_name_or_path loads it from any working directory.
    return str(base_dir.resolve()), base_dir / "tokenizer.model"


def last_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest complete checkpoint: a kill during a save leaves one without trainer_state.json."""
    complete = [
        (int(path.name.split("-")[-1]), path)
        for path in checkpoint_dir.glob("checkpoint-*")
        if path.name.split("-")[-1].isdigit() and (path / "trainer_state.json").is_file()
    ]
    return str(max(complete)[1]) if complete else None


def adapter_dtype(cfg) -> str:
    """The dtype the LoRA weights train in: `train.adapter_dtype`, by default the 4-bit base's compute
    dtype (bitsandbytes' own default for it is float32)."""
    return cfg.train.adapter_dtype or cfg.train.quantization.get("bnb_4bit_compute_dtype") or "float32"


def sft_trainer(
    model, sft_config, lora_config, dataset, tokenizer, dtype: str, callbacks, fused_lm_head=True
):
    """trl's SFTTrainer over the 4-bit base, with the adapter's trainable weights in `dtype`; without
    `fused_lm_head`, the loss is the model's own (see StageTrainer)."""
    import torch

    trainer = stage_trainer_class(fused_lm_head)(
        model=model,
        args=sft_config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config,
        callbacks=callbacks,
    )
    # trl's SFTTrainer.__init__ casts every trainable parameter of a quantized model to bfloat16 (the
    # QLoRA paper's recommendation; sft_trainer.py, "When using QLoRA, the PEFT adapter weights are
    # converted to bf16"), whatever `bf16` or the compute dtype say. On a CPU without native bf16 that
    # makes the LoRA matmuls and the hidden states 5-8x slower. The optimizer is built in train(), so
    # restoring the dtype here is all it takes. DoRA's magnitude vector stays in float32, as trl keeps it.
    wanted = getattr(torch, dtype)
    for name, param in trainer.model.named_parameters():
        if param.requires_grad and "lora_magnitude_vector" not in name and param.dtype != wanted:
            param.data = param.data.to(wanted)
    return trainer


def stage_trainer_class(fused_lm_head: bool):
    """trl's SFTTrainer, or one whose loss is transformers' own `Trainer.compute_loss`: the model's
    cross-entropy over its full logits, summed over the answer tokens and divided by the Trainer's
    `num_items_in_batch`, the normalisation trl's chunked LM head uses
    (pipeline.machine.step_plan.fused_lm_head)."""
    from transformers import Trainer
    from trl import SFTTrainer

    if fused_lm_head:
        return SFTTrainer

    class StageTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(
                self, model, {**inputs, "use_cache": False}, return_outputs, num_items_in_batch
            )

    return StageTrainer


def execution_plan(cfg, base: str, ranks: int) -> dict:
    """pipeline.machine.step_plan's plan for this base on this device, with the attention kernel, padding and
    optimizer it runs with; logged, and recorded in metrics/train.json."""
    revision = cfg.model.revision if cfg.model.tiny is None else None
    shapes = tensor_shapes(base_weight_files(base, revision)[1])
    plan = plan_step(cfg, shapes, ranks)
    attention, attention_why = attention_implementation(cfg)
    fused, fused_why = fused_lm_head(cfg)
    plan.update(
        padding_free=bool(cfg.train.sft.get("padding_free")),
        attn_implementation=attention,
        attention_why=attention_why,
        fused_lm_head=fused,
        loss_why=fused_why,
        optim=cfg.train.sft.get("optim", "adamw_torch"),
    )
    log.info(
        "each optimizer step: %d sequences = %d process(es) x micro-batch %d x %d accumulated; %s; "
        "%s attention (%s); padding-free %s; loss: %s",
        plan["batch_size"],
        plan["ranks"],
        plan["micro_batch_size"],
        plan["gradient_accumulation_steps"],
        plan["why"],
        attention,
        attention_why,
        plan["padding_free"],
        fused_why,
    )
    return plan


def build_trainer(cfg, plan: dict, base: str, tokenizer, examples: list[dict], output_dir: Path, callbacks):
    """trl's SFTTrainer for `examples` on the 4-bit base, executing steps as `plan` says."""
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig

    sft = OmegaConf.to_container(cfg.train.sft)
    try:
        sft_config = SFTConfig(
            output_dir=str(output_dir),
            # Rows are already cut to train.max_length by encode_rows; trl refuses a max_length it would
            # not enforce (padding-free batches without packing).
            max_length=None if sft.get("padding_free") and not sft.get("packing") else cfg.train.max_length,
            include_num_input_tokens_seen="non_padding",
            per_device_train_batch_size=plan["micro_batch_size"],
            gradient_accumulation_steps=plan["gradient_accumulation_steps"],
            activation_checkpointing=plan["gradient_checkpointing"],
            **sft,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"train.sft: trl's SFTConfig refused it: {err}") from err
    try:
        lora_config = LoraConfig(**OmegaConf.to_container(cfg.train.lora))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"train.lora: peft's LoraConfig refused it: {err}") from err
    model = load_quantized_base(base, cfg, attn_implementation=plan["attn_implementation"])
    return sft_trainer(
        model,
        sft_config,
        lora_config,
        datasets.Dataset.from_list(examples),
        tokenizer,
        adapter_dtype(cfg),
        callbacks=callbacks,
        fused_lm_head=plan["fused_lm_head"],
    )


def run(cfg, run_dir: Path) -> dict:
    from pipeline.chat.tokenizer import build_tokenizer, save_tokenizer
    from pipeline.checks.evaluate import answer_accuracy
    from pipeline.checks.fidelity import eval_sequences, hf_logits, perplexity

    layout = RunDir.of(cfg, run_dir)
    state = process_state()
    checkpoint_dir = layout.checkpoints
    # The main process builds the tiny base and clears stale checkpoints; the others wait, then read.
    with state.main_process_first():
        if not layout.train_rows.is_file():
            raise MissingInput(f"{layout.train_rows} not found: run stage=data first")
        train_rows, eval_rows = read_jsonl(layout.train_rows), read_jsonl(layout.eval_rows)
        base, sp_model = prepare_base(cfg, layout.base, train_rows)
        resume_from = last_checkpoint(checkpoint_dir) if cfg.train.resume == "auto" else None
        if resume_from:
            log.info("resuming from %s", resume_from)
    tokenizer = build_tokenizer(sp_model)
    examples, encode_stats = encode_rows(train_rows, tokenizer, cfg.train.max_length)
    log.info("encoded %d training examples: %s", len(examples), encode_stats)

    # How a step executes, from the estimate against this device, before the 4-bit load: a base that
    # cannot fit refuses now, naming what it needs. The libraries validate their kwargs in
    # build_trainer before anything on disk changes: a field trl or peft refuses costs no checkpoints.
    plan = execution_plan(cfg, base, state.num_processes)
    throughput = ThroughputCallback()
    trainer = build_trainer(cfg, plan, base, tokenizer, examples, checkpoint_dir, callbacks=[throughput])
    # What accelerate made of the launch: NO, MULTI_GPU, MULTI_CPU (gloo), FSDP, ... (it runs FSDP
    # only on GPU-type devices: an FSDP config launched on CPU ranks trains as MULTI_CPU data parallel).
    plan["distributed"] = trainer.accelerator.distributed_type.value
    memory = {
        "estimated_peak_bytes": plan["estimated_peak_bytes"],
        "largest_phase": "the 4-bit base, the adapter's training state and the activations",
        "memory_bytes": plan["memory_bytes"],
        "memory_from": plan["memory_from"],
    }
    # Only now, with the new run certain to start, may an older run's checkpoints go: a fresh start
    # must not mix with them. Every rank has read what it needs before the main one deletes.
    state.wait_for_everyone()
    if not resume_from and checkpoint_dir.exists() and state.is_main_process:
        shutil.rmtree(checkpoint_dir)
    state.wait_for_everyone()
    trainer.train(resume_from_checkpoint=resume_from)
    # Under FSDP each rank holds a shard of the adapter: every rank takes part in gathering it whole
    # (accelerate's FULL_STATE_DICT, on the main rank), so the saved adapter is all of it.
    sharded = trainer.is_fsdp_enabled
    adapter_state = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
    if not state.is_main_process:
        return {}  # the main process evaluates and writes the adapter, once
    if sharded:
        figures = {"step": plan, "memory_estimate": memory, "resumed_from": resume_from, **throughput.figures}
        return save_sharded_run(trainer, adapter_state, tokenizer, sp_model, layout, figures)

    # Evaluated only after training: bitsandbytes repacks 4-bit weights for its CPU inference
    # kernel on the first no-grad forward pass, and that kernel has no backward.
    def accuracy(model):
        return answer_accuracy(
            model, tokenizer, eval_rows, cfg.train.eval_max_new_tokens, cfg.train.eval_max_rows
        )

    # Perplexity of the held-out answers (assistant tokens, the eval rows' own ids), before and after.
    sequences = eval_sequences(eval_rows, tokenizer, cfg.train.eval_max_rows, cfg.train.max_length)

    def eval_perplexity(model):
        return perplexity(hf_logits(model, sequences), sequences) if sequences else None

    trained, trained_ppl = accuracy(trainer.model), eval_perplexity(trainer.model)
    with trainer.model.disable_adapter():
        untrained, untrained_ppl = accuracy(trainer.model), eval_perplexity(trainer.model)
    log.info(
        "answer accuracy: trained adapter %s, untrained base %s; eval perplexity %s -> %s",
        trained["accuracy"],
        untrained["accuracy"],
        untrained_ppl,
        trained_ppl,
    )

    with atomic_dir(layout.adapter) as tmp:
        trainer.model.save_pretrained(tmp)
        save_tokenizer(tokenizer, sp_model, tmp)

    metrics = {
        "step": plan,
        "adapter_dtype": adapter_dtype(cfg),
        "encode": encode_stats,
        "steps": trainer.state.global_step,
        "resumed_from": resume_from,
        "loss_curve": [
            {"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e
        ],
        **throughput.figures,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "memory_estimate": memory,
        "answer_accuracy_untrained_base": untrained,
        "answer_accuracy_trained": trained,
        "eval_perplexity": {
            "untrained_base": untrained_ppl,
            "trained": trained_ppl,
            "rows": len(sequences),
            "tokens": sum(len(s.targets) for s in sequences),
        },
    }
    write_json(layout.metrics("train"), metrics)
    return metrics


def save_sharded_run(trainer, adapter_state, tokenizer, sp_model, layout, figures: dict) -> dict:
    """FSDP: the gathered adapter and the training figures. The answer accuracy and perplexity are not
    measured here: a forward pass of the sharded model needs every rank, and the others have
    returned; stage=merge checks the adapter against the base and smoke evaluates the merged model."""
    from pipeline.chat.tokenizer import save_tokenizer

    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    with atomic_dir(layout.adapter) as tmp:
        peft_model.save_pretrained(tmp, state_dict=adapter_state)
        save_tokenizer(tokenizer, sp_model, tmp)
    not_run = "not run: the model is sharded across processes (FSDP); stage=merge and smoke evaluate it"
    metrics = {
        **figures,
        "steps": trainer.state.global_step,
        "loss_curve": [
            {"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e
        ],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "evaluation": not_run,
    }
    write_json(layout.metrics("train"), metrics)
    return metrics


class ThroughputCallback(TrainerCallback):
    """Train tokens/s of this process's run (a resumed run counts only what it trained itself), and on
    a GPU the peak memory torch allocated during training."""

    def __init__(self):
        self.figures = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch

        # The dtypes the trainable weights actually have as training starts (not what was configured).
        trainable = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        self.figures["adapter_dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in trainable})
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._start = (time.perf_counter(), state.num_input_tokens_seen, _cpu_seconds())

    def on_train_end(self, args, state, control, **kwargs):
        import torch

        seconds = time.perf_counter() - self._start[0]
        tokens = state.num_input_tokens_seen - self._start[1]
        gpu = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
        machine, own = (now - then for now, then in zip(_cpu_seconds(), self._start[2]))
        others = max(machine - own, 0.0) / seconds if seconds else 0.0
        self.figures = {
            **self.figures,
            "train_seconds": seconds,
            "train_tokens": tokens,
            "train_tokens_per_s": tokens / seconds if seconds else None,
            "peak_gpu_memory_gb": gpu,
            # Cores other processes kept busy meanwhile. On a CPU they cost far more than their share:
            # torch's OpenMP threads wait for each other at every op, and a descheduled one stalls the
            # rest (2-core machine, 40 tiny steps: idle 5,300-6,500 tokens/s, 4 busy processes 446).
            "cpu_cores_busy_with_other_work": round(others, 2),
            "cpu_count": os.cpu_count(),
        }
        if others > 0.25 * (os.cpu_count() or 1) and not torch.cuda.is_available():
            log.warning(
                "other processes kept %.1f of %d cores busy during training: train tokens/s (%.0f) is not "
                "comparable with a figure from an idle machine",
                others,
                os.cpu_count(),
                self.figures["train_tokens_per_s"] or 0,
            )


def _cpu_seconds() -> tuple[float, float]:
    """(CPU-seconds the whole machine has spent not idle, this process's CPU-seconds incl. children)."""
    import psutil

    machine = psutil.cpu_times()
    busy = sum(getattr(machine, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
    own = psutil.Process().cpu_times()
    return busy, own.user + own.system + own.children_user + own.children_system
