"""The fidelity ladder: for every artifact, perplexity on the eval set's assistant tokens and top-1
agreement with the merged model; floors from `export.min_top1_agreement` fail the stage."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from pipeline.errors import CheckFailed
from pipeline.layout import RunDir, quant_type

log = logging.getLogger(__name__)


@lru_cache(maxsize=2)
def merged_reference(layout: RunDir, rows: int, max_length: int, trust_remote_code: bool):
    """(eval sequences, merged model logits), computed once per process."""
    import torch

    from pipeline.fidelity import eval_sequences, hf_logits
    from pipeline.models import load_full_precision
    from pipeline.rows import read_jsonl
    from pipeline.tokenizer import load_tokenizer

    sequences = eval_sequences(read_jsonl(layout.eval_rows), load_tokenizer(layout.merged), rows, max_length)
    model = load_full_precision(layout.merged, torch.float32, trust_remote_code=trust_remote_code)
    return sequences, hf_logits(model, sequences)


def gguf_rung(cfg, layout: RunDir, gguf: Path) -> dict:
    from pipeline.fidelity import compare, llamacpp_logits, perplexity

    sequences, reference = merged_reference(
        layout, cfg.export.ladder_rows, cfg.train.max_length, cfg.model.trust_remote_code
    )
    logits = llamacpp_logits(gguf, sequences)
    rung = {"perplexity": perplexity(logits, sequences), **compare(logits, reference)}
    type_name = quant_type(gguf)
    floor = cfg.export.min_top1_agreement.get(type_name)
    agreement = rung["top1_agreement"]
    log.info(
        "%s: top-1 agreement with merged %.4f (floor %s), perplexity %.3f",
        gguf.name,
        agreement,
        floor,
        rung["perplexity"],
    )
    if floor is not None and agreement < floor:
        raise CheckFailed(
            f"{gguf.name}: top-1 agreement with the merged model {agreement:.4f} "
            f"is below export.min_top1_agreement.{type_name}={floor}"
        )
    return rung


def ladder_table(manifest_data: dict) -> list[dict]:
    """One row per artifact, from what the stages recorded in the manifest."""
    stages = manifest_data.get("stages", {})
    rows = []
    merge = stages.get("merge", {}).get("metrics", {}).get("fidelity", {})
    if merge:
        adapter = merge["4bit_adapter"]
        rows.append(
            {
                "artifact": "4-bit base + adapter",
                "perplexity": adapter["perplexity"],
                "top1_agreement_with_merged": adapter["top1_agreement_with_merged"],
            }
        )
        rows.append(
            {
                "artifact": "merged",
                "perplexity": merge["merged"]["perplexity"],
                "top1_agreement_with_merged": 1.0,
            }
        )
    for stage in ("convert", "quantize"):
        for type_name, rung in stages.get(stage, {}).get("metrics", {}).get("ladder", {}).items():
            rows.append(
                {
                    "artifact": f"GGUF {type_name}",
                    "perplexity": rung["perplexity"],
                    "top1_agreement_with_merged": rung["top1_agreement"],
                    "kl_per_token": rung["kl_per_token"],
                }
            )
    return rows
