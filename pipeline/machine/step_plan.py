"""How one optimizer step of training executes on this device, chosen before the base is loaded.

The math is the recipe's and does not change: `train.batch_size` sequences per optimizer step (over
all processes), the loss summed over every answer token of those sequences and divided by their
count (transformers' `num_items_in_batch`, which trl's loss uses). What changes is only how the
step is executed:

- micro-batch x accumulation: the largest divisor of the per-process batch whose memory estimate
  (`pipeline.machine.memory.train_needs`) fits the device, unless `train.micro_batch_size` names one;
- gradient checkpointing: on only when no micro-batch fits without it (`train.gradient_checkpointing`
  overrides);
- the attention kernel: flash-attention where it is installed on a GPU, else PyTorch SDPA; with
  `train.sft.padding_free` both keep the flattened sequences apart (flash-attention by trl's
  sequence boundaries, SDPA by the block-diagonal mask transformers builds from the position ids:
  tests/test_step_math.py proves it);
- the loss kernel: trl's chunked LM head where Triton runs it, else the model's own cross-entropy
  (the same sum over answer tokens divided by `num_items_in_batch`).

The plan, and why each choice was made, is recorded in metrics/train.json and the run summary.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pipeline.config import AUTO, check_step_settings, register
from pipeline.machine.diskspace import human
from pipeline.machine.memory import PROCESS_BYTES, NoMemory, device_memory, train_needs
from pipeline.run.errors import ConfigError


def divisors(n: int) -> list[int]:
    """Every divisor of n, largest first."""
    return [d for d in range(n, 0, -1) if n % d == 0]


def attention_implementation(cfg) -> tuple[str, str]:
    """(transformers' attn_implementation, why)."""
    import torch

    chosen = cfg.train.attn_implementation
    if chosen != AUTO:
        return chosen, f"set by train.attn_implementation={chosen}"
    dtype = cfg.train.quantization.get("bnb_4bit_compute_dtype") or "float32"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "flash-attn is not installed: PyTorch SDPA"
    if not torch.cuda.is_available():
        return "sdpa", "no CUDA device for flash-attn: PyTorch SDPA"
    if dtype not in ("bfloat16", "float16"):
        return "sdpa", f"flash-attn needs 16-bit compute, not {dtype}: PyTorch SDPA"
    return "flash_attention_2", "flash-attn is installed and the compute dtype is 16-bit"


def fused_lm_head(cfg) -> tuple[bool, str]:
    """(whether the loss goes through trl's chunked LM head, why). Both divide the summed answer-token
    loss by `num_items_in_batch`; trl's never builds the whole logits, but it runs as Triton kernels
    only on CUDA and XPU, and as Python loops over tiles elsewhere (measured on a 2-core CPU,
    guanaco_tiny: 80% of each step, against the model's own loss over its full logits)."""
    import torch

    chosen = cfg.train.fused_lm_head
    if chosen != AUTO:
        return bool(chosen), f"set by train.fused_lm_head={str(chosen).lower()}"
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        return True, "trl's chunked LM head: Triton kernels, the logits never whole"
    return False, "the model's own loss over its logits: trl's chunked LM head has no Triton kernel here"


def plan_step(cfg, shapes: dict, ranks: int, memory: tuple[int, str] | None = None) -> dict:
    """The micro-batch, accumulation and checkpointing for `train.batch_size` over `ranks` processes,
    from the memory estimate against this device (or `memory`: bytes, where the figure comes from);
    raises NoMemory when not even the leanest fits."""
    batch = cfg.train.batch_size
    if batch % ranks:
        raise ConfigError(
            f"train.batch_size={batch}: not divisible by the {ranks} processes it is split over"
        )
    per_rank = batch // ranks
    micro_setting, checkpointing_setting = cfg.train.micro_batch_size, cfg.train.gradient_checkpointing
    if micro_setting != AUTO and per_rank % micro_setting:
        raise ConfigError(
            f"train.micro_batch_size={micro_setting}: expected a divisor of the {per_rank} sequences "
            f"each of the {ranks} processes takes per step (train.batch_size={batch})"
        )
    have, source = memory or device_memory(cfg)
    micro_options = divisors(per_rank) if micro_setting == AUTO else [micro_setting]
    # Checkpointing recomputes every layer's forward (about a fifth more time): only when needed.
    checkpointing_options = [False, True] if checkpointing_setting == AUTO else [checkpointing_setting]

    def need(micro: int, checkpointing: bool) -> int:
        return max(train_needs(shapes, cfg, micro, checkpointing).values()) + PROCESS_BYTES

    for checkpointing in checkpointing_options:
        for micro in micro_options:
            if need(micro, checkpointing) <= have:
                return {
                    "batch_size": batch,
                    "ranks": ranks,
                    "micro_batch_size": micro,
                    "gradient_accumulation_steps": per_rank // micro,
                    "gradient_checkpointing": checkpointing,
                    "estimated_peak_bytes": need(micro, checkpointing),
                    "memory_bytes": have,
                    "memory_from": source,
                    "why": why(cfg, per_rank, micro, checkpointing, need, have, source),
                }
    micro, checkpointing = micro_options[-1], checkpointing_options[-1]
    raise NoMemory(
        f"stage train needs about {human(need(micro, checkpointing))} of memory (micro-batch {micro}, "
        f"gradient checkpointing {'on' if checkpointing else 'off'}: the 4-bit base, the adapter's "
        f"training state and the activations), {human(have)} {source}: free memory, or run it on a "
        "larger machine"
    )


def why(cfg, per_rank: int, micro: int, checkpointing: bool, need, have: int, source: str) -> str:
    """The reason for the plan, in words, with the estimates it was chosen by."""
    fits = f"{human(need(micro, checkpointing))} estimated, {human(have)} {source}"
    if cfg.train.micro_batch_size != AUTO:
        micro_part = f"micro-batch {micro}: set by train.micro_batch_size ({fits})"
    elif micro == per_rank:
        micro_part = f"micro-batch {micro}: the whole per-process batch fits ({fits})"
    else:
        larger = divisors(per_rank)[divisors(per_rank).index(micro) - 1]
        micro_part = (
            f"micro-batch {micro}: the largest divisor of {per_rank} that fits ({fits}; "
            f"{larger} would need {human(need(larger, checkpointing))})"
        )
    if cfg.train.gradient_checkpointing != AUTO:
        ckpt_part = (
            f"gradient checkpointing {'on' if checkpointing else 'off'}: set by train.gradient_checkpointing"
        )
    elif checkpointing:
        smallest = 1 if cfg.train.micro_batch_size == AUTO else micro
        ckpt_part = (
            f"gradient checkpointing on: without it even micro-batch {smallest} would need "
            f"{human(need(smallest, False))}"
        )
    else:
        ckpt_part = "gradient checkpointing off: the activations fit without it"
    return f"{micro_part}; {ckpt_part}"


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int) -> dict[str, list[int]]:
    """The weight shapes of a Llama checkpoint (multi-head attention), as its safetensors name them."""
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "lm_head.weight": [vocab, hidden]}
    shapes["model.norm.weight"] = [hidden]
    for i in range(layers):
        layer = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{layer}.self_attn.{name}.weight"] = [hidden, hidden]
        shapes[f"{layer}.mlp.gate_proj.weight"] = [intermediate, hidden]
        shapes[f"{layer}.mlp.up_proj.weight"] = [intermediate, hidden]
        shapes[f"{layer}.mlp.down_proj.weight"] = [hidden, intermediate]
        shapes[f"{layer}.input_layernorm.weight"] = [hidden]
        shapes[f"{layer}.post_attention_layernorm.weight"] = [hidden]
    return shapes


LLAMA2_7B_SHAPES = llama_shapes(hidden=4096, intermediate=11008, layers=32, vocab=32000)


def main() -> None:
    """What the recipe's step becomes on GPUs of the given sizes, at Llama-2-7B's shape, from the
    estimate:

        python -m pipeline.machine.step_plan [train=qlora_lean] [key=value ...] [--memory 16GB 24GB ...]
    """
    import argparse

    from hydra import compose, initialize_config_dir

    from pipeline.machine.memory import parse_size

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("overrides", nargs="*", help="config overrides, as the pipeline takes them")
    parser.add_argument("--memory", nargs="+", default=["16GB", "24GB", "40GB", "80GB"])
    args = parser.parse_args()
    register()
    with initialize_config_dir(
        config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"
    ):
        cfg = compose("config", overrides=args.overrides)
    check_step_settings(cfg)
    print(
        f"Llama-2-7B shape, train={cfg.train.name}, {cfg.train.max_length}-token sequences, "
        f"LoRA r={cfg.train.lora.r}"
    )
    for size in args.memory:
        # A GPU of this size, less the 10% the stage keeps back for the allocator.
        have = int(parse_size(size, "--memory") * 0.9)
        try:
            plan = plan_step(cfg, LLAMA2_7B_SHAPES, 1, memory=(have, f"on a {size} GPU"))
        except NoMemory as err:
            print(f"{size:>6}: does not fit: {err}")
            continue
        print(
            f"{size:>6}: micro-batch {plan['micro_batch_size']} x {plan['gradient_accumulation_steps']}, "
            f"checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}, "
            f"estimated {human(plan['estimated_peak_bytes'])}"
        )


if __name__ == "__main__":
    main()
