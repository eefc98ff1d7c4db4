"""`model=tiny`: a Llama-architecture model small enough for a CPU, built locally and deterministically.

Random init from a fixed seed, and a Llama-style SentencePiece tokenizer trained on the run's
training data (or the real Llama-2 tokenizer when `model.tokenizer_path` is set). It is saved as an
ordinary Hugging Face directory, so every later stage treats it exactly like a hub model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.chat import B_INST, E_INST
from pipeline.io import atomic_dir
from pipeline.tokenizer import build_tokenizer, save_tokenizer, train_sentencepiece

log = logging.getLogger(__name__)


def tokenizer_corpus(rows: list[dict]) -> list[str]:
    """Training text for the tiny tokenizer: the dialogs laid out as the chat format lays them out."""
    lines = []
    for row in rows:
        for message in row["messages"]:
            content = message["content"].strip()
            lines.append(f"{B_INST} {content} {E_INST}" if message["role"] != "assistant" else content)
    return lines


def build_tiny_base(tiny_cfg, tokenizer_path: str | None, rows: list[dict], out_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    with atomic_dir(out_dir) as tmp:
        if tokenizer_path:
            sp_model = Path(tokenizer_path)
        else:
            sp_model = tmp / "tokenizer.model"
            train_sentencepiece(tokenizer_corpus(rows), tiny_cfg.vocab_size, sp_model)
        tokenizer = build_tokenizer(sp_model)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=tiny_cfg.hidden_size,
            intermediate_size=tiny_cfg.intermediate_size,
            num_hidden_layers=tiny_cfg.num_hidden_layers,
            num_attention_heads=tiny_cfg.num_attention_heads,
            num_key_value_heads=tiny_cfg.num_key_value_heads,
            max_position_embeddings=tiny_cfg.max_position_embeddings,
            rms_norm_eps=1e-5,  # Llama-2's
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        torch.manual_seed(tiny_cfg.seed)
        model = LlamaForCausalLM(config)
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, sp_model, tmp)
        n_params = sum(p.numel() for p in model.parameters())
    log.info("built tiny base %s: %.1fM parameters, vocab %d", out_dir, n_params / 1e6, len(tokenizer))
