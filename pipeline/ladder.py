"""The fidelity ladder: for every artifact, perplexity on the eval set's assistant tokens and top-1
agreement with the merged model; floors from `export.min_top1_agreement` fail the stage."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)


@lru_cache(maxsize=2)
def merged_reference(run_dir: Path, rows: int, max_length: int, trust_remote_code: bool):
    """(eval sequences, merged model logits), computed once per process."""
    import torch

    from pipeline.data import read_jsonl
    from pipeline.fidelity import eval_sequences, hf_logits
    from pipeline.merge import load_full_precision
    from pipeline.tokenizer import load_tokenizer

    merged = run_dir / "merged"
    sequences = eval_sequences(read_jsonl(run_dir / "data" / "eval.jsonl"), load_tokenizer(merged), rows, max_length)
    model = load_full_precision(merged, torch.float32, trust_remote_code=trust_remote_code)
    return sequences, hf_logits(model, sequences)


def gguf_rung(cfg, run_dir: Path, gguf: Path) -> dict:
    from pipeline.fidelity import compare, llamacpp_logits, perplexity

    sequences, reference = merged_reference(
        run_dir, cfg.export.ladder_rows, cfg.train.max_length, cfg.model.trust_remote_code
    )
    logits = llamacpp_logits(gguf, sequences)
    rung = {"perplexity": perplexity(logits, sequences), **compare(logits, reference)}
    type_name = gguf.stem.rsplit("-", 1)[-1]
    floor = cfg.export.min_top1_agreement.get(type_name)
    log.info("%s: top-1 agreement with merged %.4f (floor %s), perplexity %.3f",
             gguf.name, rung["top1_agreement"], floor, rung["perplexity"])  # fmt: skip
    if floor is not None and rung["top1_agreement"] < floor:
        raise ValueError(f"{gguf.name}: top-1 agreement with the merged model {rung['top1_agreement']:.4f} "
                         f"is below export.min_top1_agreement.{type_name}={floor}")  # fmt: skip
    return rung


def ladder_table(manifest_data: dict) -> list[dict]:
    """One row per artifact, from what the stages recorded in the manifest."""
    stages = manifest_data.get("stages", {})
    rows = []
    merge = stages.get("merge", {}).get("metrics", {}).get("fidelity", {})
    if merge:
        rows.append({"artifact": "4-bit base + adapter", "perplexity": merge["4bit_adapter"]["perplexity"],
                     "top1_agreement_with_merged": merge["4bit_adapter"]["top1_agreement_with_merged"]})  # fmt: skip
        rows.append({"artifact": "merged", "perplexity": merge["merged"]["perplexity"], "top1_agreement_with_merged": 1.0})
    for stage in ("convert", "quantize"):
        for type_name, rung in stages.get(stage, {}).get("metrics", {}).get("ladder", {}).items():
            rows.append({"artifact": f"GGUF {type_name}", "perplexity": rung["perplexity"],
                         "top1_agreement_with_merged": rung["top1_agreement"], "kl_per_token": rung["kl_per_token"]})  # fmt: skip
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'artifact':<22} {'perplexity':>10} {'top-1 vs merged':>16}"]
    for r in rows:
        lines.append(f"{r['artifact']:<22} {r['perplexity']:>10.3f} {r['top1_agreement_with_merged']:>16.4f}")
    return "\n".join(lines)
