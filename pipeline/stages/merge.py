"""Merge stage: fold the LoRA adapter into the base weights, shard by shard, into `run_dir/merged/`.

Never holds the model twice: each base tensor is read, gets its LoRA delta `scale * B @ A`
added (in float32), and goes to the output shard being filled, which is written out once it
reaches `merge.max_shard_size`. Peak memory is about one output shard plus the adapter.

`merge.base` says what the deltas are added to:
- original: the base weights as published (unsloth's choice);
- nf4_roundtrip: dequantize(quantize_nf4(W)), the weights the adapter was trained against
  (axolotl's choice). Both are measured against the 4-bit base + adapter (see conf/merge/).
Before the directory gets its final name the stage checks itself: the merged model's logits
against the model it claims to equal, within the stated tolerance, or it fails.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from pipeline.chat.rows import read_jsonl
from pipeline.chat.tokenizer import load_tokenizer
from pipeline.checks.fidelity import compare, eval_sequences, hf_logits, perplexity
from pipeline.machine.diskspace import DTYPE_BYTES, require_free, safetensors_elements
from pipeline.machine.memory import (
    anonymous_bytes,
    merge_needs,
    phase_peaks,
    release_freed_memory,
    require_memory,
    tensor_shapes,
)
from pipeline.models.card import write_model_card
from pipeline.models.load import base_weight_files, load_4bit_with_adapter, load_full_precision, local_base
from pipeline.models.shards import ShardWriter
from pipeline.run.errors import MergeError, MissingInput
from pipeline.run.io import atomic_dir, write_json
from pipeline.run.layout import RunDir
from pipeline.run.progress import progress

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def parse_size(size: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper())
    if not match:
        raise MergeError(f"merge.max_shard_size={size!r}: expected a size like 500MB or 2GB")
    return int(float(match[1]) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[match[2]])


def load_adapter(adapter_dir: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """adapter_config and {base weight name: (lora_A, lora_B, scale)}."""
    config_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise MissingInput(f"{path} not found: run stage=train first (or point run_dir at a trained run)")
    config = json.loads(config_path.read_text())
    unsupported = {
        "peft_type": config.get("peft_type") != "LORA",
        "use_dora": bool(config.get("use_dora")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
    }
    if any(unsupported.values()):
        raise MergeError(
            f"{config_path}: not a plain LoRA adapter ({[k for k, v in unsupported.items() if v]})"
        )
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / r**0.5 if config.get("use_rslora") else alpha / r  # peft's LoRA scaling
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(weights_path, "pt") as f:
        for key in f.keys():
            match = ADAPTER_KEY.match(key)
            if not match:
                raise MergeError(f"{weights_path}: unexpected tensor {key!r}")
            parts.setdefault(match["module"] + ".weight", {})[match["part"]] = f.get_tensor(key)
    deltas = {name: (p["A"], p["B"], scale) for name, p in parts.items()}
    return config, deltas


def check_adapter_fits(deltas: dict, base_files: list[Path]) -> None:
    """Fail before any work, with the tensor named, when the adapter was made for another base."""
    shapes = {}
    for path in base_files:
        with safe_open(path, "pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    missing = sorted(set(deltas) - set(shapes))
    if missing:
        raise MergeError(
            f"adapter made for another base: it adapts {missing[0]}, which the base does not have"
        )
    for name, (lora_a, lora_b, _) in deltas.items():
        delta_shape = (lora_b.shape[0], lora_a.shape[1])
        if shapes[name] != delta_shape:
            raise MergeError(
                f"adapter made for another base: {name} has shape {shapes[name]} in the base, "
                f"the adapter's delta is {delta_shape}"
            )


def quantized_linear_names(base_dir: Path, trust_remote_code: bool) -> set[str]:
    """Weights that bitsandbytes quantized in training: every nn.Linear but the output head."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    skip = {"lm_head"}  # transformers keeps the output embedding in full precision
    return {
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in skip
    }


def nf4_roundtrip(weight: torch.Tensor, quantization: dict) -> torch.Tensor:
    """dequantize(quantize_nf4(W)) with the training run's bitsandbytes settings."""
    import bitsandbytes.functional as bnbf

    compute_dtype = getattr(torch, quantization.get("bnb_4bit_compute_dtype", "float32"))
    quantized, state = bnbf.quantize_4bit(
        weight.to(compute_dtype),  # transformers loads in the compute dtype, then quantizes
        blocksize=64,
        compress_statistics=quantization.get("bnb_4bit_use_double_quant", False),
        quant_type=quantization.get("bnb_4bit_quant_type", "nf4"),
    )
    return bnbf.dequantize_4bit(quantized, state)


def merge_weights(
    base_files: list[Path],
    deltas: dict,
    out_dir: Path,
    dtype: torch.dtype,
    max_bytes: int,
    roundtrip: set[str],
    quantization: dict,
) -> dict:
    """Stream every base tensor through (roundtrip?) + delta into output shards. The adapter must
    fit the base (`check_adapter_fits`)."""
    writer, merged = ShardWriter(out_dir, max_bytes), 0
    for path in progress(base_files, "merge", unit="shard"):
        # pread, not mmap: a mapped shard stays resident until it is closed (2 GB per 7B shard on top
        # of the output shard); read this way only the tensor in hand is.
        with safe_open(path, "pt", backend="pread") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if name in roundtrip:
                    tensor = nf4_roundtrip(tensor, quantization)  # a fresh float32 tensor
                if name in deltas:
                    lora_a, lora_b, scale = deltas[name]
                    if name not in roundtrip or tensor.dtype != torch.float32:
                        tensor = tensor.to(torch.float32, copy=True)
                    # W + scale * B @ A in place: no (out, in) float32 temporaries besides W itself
                    tensor.addmm_(lora_b.float(), lora_a.float(), alpha=scale)
                    merged += 1
                writer.add(name, tensor.to(dtype))
                del tensor
    shards = writer.close()
    return {"tensors_merged": merged, "shards": len(shards)}


def write_config_files(
    base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: torch.dtype, trust_remote_code: bool
) -> None:
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    config.dtype = dtype
    config.save_pretrained(out_dir)
    tokenizer = load_tokenizer(adapter_dir)
    generation = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # generation stops on the EOS every answer was trained to end on
        pad_token_id=tokenizer.pad_token_id,
    )
    generation.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:  # the tokenizer exactly as trained, chat template included
        shutil.copyfile(adapter_dir / name, out_dir / name)


def run(cfg, run_dir: Path) -> dict:
    layout = RunDir.of(cfg, run_dir)
    adapter_dir = layout.adapter
    adapter_config, deltas = load_adapter(adapter_dir)
    base = local_base(adapter_config["base_model_name_or_path"], layout)
    base_dir, base_files = base_weight_files(base, cfg.model.revision)
    check_adapter_fits(deltas, base_files)
    # The merged model is checked with what exceeds twice the largest base shard left on disk: the
    # stage never holds more than that, plus the 4-bit reference and the adapter, at any size.
    resident = 2 * max(path.stat().st_size for path in base_files)
    needs = merge_needs(tensor_shapes(base_files), cfg, parse_size(cfg.merge.max_shard_size), resident)
    memory = require_memory(cfg, "merge", needs)
    merged_bytes = safetensors_elements(base_files) * DTYPE_BYTES[cfg.merge.dtype]
    require_free(layout.merged.parent, merged_bytes, f"the merged model in {cfg.merge.dtype}")
    dtype, mode = getattr(torch, cfg.merge.dtype), cfg.merge.base.value
    quantization = OmegaConf.to_container(cfg.train.quantization)
    tokenizer = load_tokenizer(adapter_dir)
    sequences = eval_sequences(
        read_jsonl(layout.eval_rows), tokenizer, cfg.merge.check_rows, cfg.train.max_length
    )
    if not sequences:
        raise MergeError(f"{layout.eval_rows}: no eval rows to check the merge on")

    # What the adapter was trained against: the reference for every fidelity figure.
    phase_peaks()
    trained_logits = hf_logits(load_4bit_with_adapter(base, adapter_dir, cfg), sequences)
    release_freed_memory()  # the 4-bit model goes before the fold starts (peft's wrappers hold cycles)
    peaks = {"4bit_reference": phase_peaks()}  # this process's peak (RSS, anonymous) of each phase, MB
    figures = {"4bit_adapter": {"perplexity": perplexity(trained_logits, sequences)}}

    remote_code = cfg.model.trust_remote_code
    quantized_names = quantized_linear_names(base_dir, remote_code)

    def merge_to(out_dir: Path, mode: str) -> dict:
        roundtrip = quantized_names if mode == "nf4_roundtrip" else set()
        max_bytes = parse_size(cfg.merge.max_shard_size)
        stats = merge_weights(base_files, deltas, out_dir, dtype, max_bytes, roundtrip, quantization)
        write_config_files(base_dir, adapter_dir, out_dir, dtype, remote_code)
        return stats

    if cfg.merge.compare_bases:  # the evidence behind the default of merge.base
        other = "original" if mode == "nf4_roundtrip" else "nf4_roundtrip"
        with atomic_dir(layout.merge_compare) as tmp:
            merge_to(tmp, other)
            other_logits = hf_logits(
                load_full_precision(tmp, dtype, trust_remote_code=remote_code, max_memory=resident), sequences
            )
            figures[f"merged_{other}"] = compare(other_logits, trained_logits)
        shutil.rmtree(layout.merge_compare)

    with atomic_dir(layout.merged) as tmp:
        phase_peaks()
        fold_start_anon = anonymous_bytes(os.getpid())  # the adapter's deltas, the logits, the libraries
        stats = merge_to(tmp, mode)
        peaks["fold"] = phase_peaks()
        merged = load_full_precision(tmp, dtype, trust_remote_code=remote_code, max_memory=resident)
        merged_logits = hf_logits(merged, sequences)
        del merged
        release_freed_memory()
        peaks["self_check"] = phase_peaks()
        figures[f"merged_{mode}"] = compare(merged_logits, trained_logits)
        figures["merged"] = {
            "perplexity": perplexity(merged_logits, sequences),
            "top1_agreement_with_merged": 1.0,
        }
        figures["4bit_adapter"]["top1_agreement_with_merged"] = compare(trained_logits, merged_logits)[
            "top1_agreement"
        ]

        # Self-check: the merged weights must compute what they claim to fold.
        if mode == "original":
            reference = hf_logits(load_full_precision(base_dir, dtype, adapter_dir, remote_code), sequences)
            reference_name = "full-precision base + adapter (unmerged)"
        else:
            reference, reference_name = trained_logits, "4-bit base + adapter"
        check = compare(merged_logits, reference)
        check.update(reference=reference_name, max_abs_logit_diff_allowed=cfg.merge.max_abs_logit_diff)
        if check["max_abs_logit_diff"] > cfg.merge.max_abs_logit_diff:
            raise MergeError(
                f"merge self-check failed: max |logit difference| against the {reference_name} is "
                f"{check['max_abs_logit_diff']:.3g} > merge.max_abs_logit_diff={cfg.merge.max_abs_logit_diff}"
            )
        metrics = {
            "base": base,
            "mode": mode,
            "dtype": cfg.merge.dtype,
            **stats,
            "self_check": check,
            "fidelity": figures,
            "memory_estimate": memory,
            "phase_peak_rss_mb": {phase: rss for phase, (rss, _) in peaks.items()},
            "phase_peak_anon_mb": {phase: anon for phase, (_, anon) in peaks.items()},
            "fold_start_anon_mb": round(fold_start_anon / 1e6, 1),
            # The fold's bound: twice the largest base shard plus the adapter.
            "fold_bound_mb": round(
                (resident + sum(f.stat().st_size for f in adapter_dir.iterdir())) / 1e6, 1
            ),
        }
        write_model_card(tmp, cfg, layout.metrics("train"), metrics)
    log.info(
        "merge self-check: max |dlogit| %.3g (allowed %s), top-1 agreement %.4f",
        check["max_abs_logit_diff"],
        cfg.merge.max_abs_logit_diff,
        check["top1_agreement"],
    )
    write_json(layout.metrics("merge"), metrics)
    return metrics
