"""Ladder stage: every artifact of the run measured against the F16 GGUF, so a quant is picked by
evidence. On the held-out eval rows (the ids of `encode_dialog`, assistant tokens only), for the
4-bit base + adapter, the merged model, the F16 GGUF and each quant:

- mean and 99th-percentile KL divergence of the next-token distribution from the F16 GGUF's (what
  `llama-perplexity --kl-divergence` reports, there over whole text chunks);
- top-1 agreement with the F16 GGUF; perplexity and its difference from the F16's; file size.

Each quant is also made the other way (with the importance matrix if the shipped file has none,
without it if it has one) in a scratch dir and measured the same way: the with/without-imatrix
comparison behind `export.imatrix.types`. Floors from `export.min_top1_agreement` fail the stage.
Writes `metrics/ladder.json` and `gguf/README.md`, the GGUF folder's model card with the table.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

from pipeline.chat.rows import read_jsonl
from pipeline.chat.tokenizer import load_tokenizer
from pipeline.checks.fidelity import eval_sequences, hf_logits, llamacpp_logits, rung
from pipeline.engines.gguf import check_gguf_loads, quantize_gguf
from pipeline.engines.llamacpp import LlamaCpp
from pipeline.machine.diskspace import human
from pipeline.machine.memory import (
    PROCESS_BYTES,
    adapted_4bit_bytes,
    checkpoint_shapes,
    fits,
    release_freed_memory,
    require_memory,
    weights_bytes,
)
from pipeline.models.card import gguf_card
from pipeline.models.load import load_4bit_with_adapter, load_full_precision, local_base
from pipeline.run.errors import CheckFailed, MissingInput
from pipeline.run.io import atomic_file, write_json
from pipeline.run.layout import OUTTYPES, RunDir
from pipeline.run.progress import progress

log = logging.getLogger(__name__)


def run(cfg, run_dir: Path) -> dict:
    layout = RunDir.of(cfg, run_dir)
    reference_type = OUTTYPES[cfg.export.outtype]
    reference_gguf = layout.gguf(reference_type)
    quants = [q for q in cfg.export.quants if q != reference_type]
    for path in [reference_gguf, *(layout.gguf(q) for q in quants)]:
        if not path.is_file():
            raise MissingInput(f"{path} not found: run stage=convert and stage=quantize first")
        check_gguf_loads(path)
    tokenizer = load_tokenizer(layout.merged)
    sequences = eval_sequences(
        read_jsonl(layout.eval_rows), tokenizer, cfg.export.ladder_rows, cfg.train.max_length
    )
    if not sequences:
        raise MissingInput(f"{layout.eval_rows}: no eval rows to measure the ladder on")

    # Before any model loads: the largest thing the ladder holds at once must fit.
    merged_shapes = checkpoint_shapes(layout.merged)
    needs = {
        f"{reference_gguf.name}, which llama.cpp maps whole": reference_gguf.stat().st_size,
        "the 4-bit base + adapter": adapted_4bit_bytes(merged_shapes, cfg),
        "the merged model, twice its largest shard in memory": 2
        * max(p.stat().st_size for p in layout.merged.glob("*.safetensors")),
    }
    memory = require_memory(cfg, "ladder", needs)
    steps = progress(desc="ladder", total=3 + 2 * len(quants), unit="artifact")
    reference = llamacpp_logits(reference_gguf, sequences)
    rungs = {}

    def measure(name: str, logits, size: int | None, **extra) -> dict:
        figures = {**rung(logits, reference, sequences), "size_bytes": size, **extra}
        rungs[name] = figures
        steps.update()
        return figures

    adapter_config = read_adapter_base(layout)
    base = local_base(adapter_config, layout)
    model = load_4bit_with_adapter(base, layout.adapter, cfg)
    adapter_bytes = sum(f.stat().st_size for f in layout.adapter.glob("*.safetensors"))
    measure("4-bit base + adapter", hf_logits(model, sequences), None, adapter_bytes=adapter_bytes)
    del model
    release_freed_memory()  # peft's wrappers hold reference cycles
    dtype, why, resident = merged_rung_dtype(cfg, layout.merged, merged_shapes)
    remote_code = cfg.model.trust_remote_code
    merged = load_full_precision(layout.merged, dtype, trust_remote_code=remote_code, max_memory=resident)
    merged_bytes = sum(f.stat().st_size for f in layout.merged.glob("*.safetensors"))
    measure("merged", hf_logits(merged, sequences), merged_bytes, compute_dtype=str(dtype)[6:], dtype_why=why)
    del merged
    release_freed_memory()
    measure(f"GGUF {reference_type}", reference, reference_gguf.stat().st_size)

    imatrix = {"types": list(cfg.export.imatrix.types), "file": layout.imatrix.name, "comparison": {}}
    llamacpp = LlamaCpp(cfg.llamacpp.dir)
    with tempfile.TemporaryDirectory(prefix="ladder-", dir=layout.root) as scratch:
        for type_name in quants:
            shipped = layout.gguf(type_name)
            with_imatrix = type_name in cfg.export.imatrix.types
            figures = measure(
                f"GGUF {type_name}",
                llamacpp_logits(shipped, sequences),
                shipped.stat().st_size,
                imatrix=with_imatrix,
            )
            other = Path(scratch) / shipped.name
            use = None if with_imatrix else layout.imatrix
            if use is not None and not use.is_file():
                steps.update()
                continue  # no importance matrix in this run (export.imatrix.types empty)
            quantize_gguf(reference_gguf, other, type_name, llamacpp, imatrix=use)
            other_figures = rung(llamacpp_logits(other, sequences), reference, sequences)
            other.unlink()
            steps.update()
            pair = (figures, other_figures) if with_imatrix else (other_figures, figures)
            imatrix["comparison"][type_name] = {
                "kl_mean_with": pair[0]["kl_mean"],
                "kl_mean_without": pair[1]["kl_mean"],
                "kl_p99_with": pair[0]["kl_p99"],
                "kl_p99_without": pair[1]["kl_p99"],
                "shipped": "with" if with_imatrix else "without",
            }
    steps.close()
    reference_ppl = rungs[f"GGUF {reference_type}"]["perplexity"]
    for figures in rungs.values():
        figures["delta_perplexity"] = figures["perplexity"] - reference_ppl
    check_floors(cfg, rungs)

    metrics = {
        "reference": reference_gguf.name,
        "rows": len(sequences),
        "rungs": rungs,
        "imatrix": imatrix,
        "memory_estimate": memory,
    }
    write_json(layout.metrics("ladder"), metrics)
    with atomic_file(layout.gguf_dir / "README.md") as tmp:
        tmp.write_text(gguf_card(cfg, metrics), encoding="utf-8")
    for name, figures in rungs.items():
        kl, p99, top1, dppl = (
            figures[k] for k in ("kl_mean", "kl_p99", "top1_agreement", "delta_perplexity")
        )
        log.info("%s: KL mean %.5f p99 %.5f, top-1 %.4f, dPPL %+.4f", name, kl, p99, top1, dppl)
    return metrics


def merged_rung_dtype(cfg, merged_dir: Path, shapes: dict) -> tuple[torch.dtype, str, int | None]:
    """(dtype, why, bytes kept in memory or None for all). float32 where it fits: the merged weights
    computed without rounding. At 7B float32 is 27 GB: then the dtype merge saved (bfloat16) with
    what exceeds twice the largest shard read from disk layer by layer, activations rounded to
    bfloat16. Its cost, measured against the float32 rung on experiment=llama2_7b_shape cut to 2
    layers (3 eval rows, 202 tokens): KL 1.9e-4 a token, max |dlogit| 0.11, top-1 agreement 0.96
    (a random model's flat logits flip on small changes)."""
    need = weights_bytes(shapes, 4)
    if fits(cfg, need):
        return torch.float32, "float32 fits", None
    saved = json.loads((merged_dir / "config.json").read_text()).get("dtype") or "bfloat16"
    resident = 2 * max(p.stat().st_size for p in merged_dir.glob("*.safetensors"))
    why = f"float32 would need {human(need + PROCESS_BYTES)}, more than the memory available"
    return getattr(torch, saved), why, resident


def read_adapter_base(layout: RunDir) -> str:
    import json

    config = layout.adapter / "adapter_config.json"
    if not config.is_file():
        raise MissingInput(f"{config} not found: run stage=train first")
    return json.loads(config.read_text())["base_model_name_or_path"]


def check_floors(cfg, rungs: dict) -> None:
    for name, figures in rungs.items():
        type_name = name.removeprefix("GGUF ")
        floor = cfg.export.min_top1_agreement.get(type_name)
        if floor is not None and figures["top1_agreement"] < floor:
            raise CheckFailed(
                f"{name}: top-1 agreement with the F16 GGUF {figures['top1_agreement']:.4f} "
                f"is below export.min_top1_agreement.{type_name}={floor}"
            )
