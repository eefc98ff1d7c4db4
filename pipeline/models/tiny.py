"""`model=tiny`: a Llama-architecture model built locally and deterministically, small enough for
a CPU (`model=tiny`), or with Llama-2-7B's exact shape (`model=llama2_7b_shape`).

Random init from a fixed seed, and a Llama-style SentencePiece tokenizer trained on the run's
training data (or the real Llama-2 tokenizer when `model.tokenizer_path` is set). It is saved as an
ordinary Hugging Face directory, so every later stage treats it exactly like a hub model. With
`model.tiny.max_shard_size` set it is written tensor by tensor into shards, as a 7B base must be:
transformers would build it whole, in float32 (27 GB at 7B).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.chat.format import B_INST, E_INST
from pipeline.chat.tokenizer import build_tokenizer, save_tokenizer, train_sentencepiece
from pipeline.run.io import atomic_dir

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
        generation = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        dtype = getattr(torch, tiny_cfg.get("dtype") or "float32")
        if tiny_cfg.get("max_shard_size"):
            n_params = write_random_shards(config, tmp, dtype, tiny_cfg.max_shard_size, tiny_cfg.seed)
            config.dtype = dtype
            config.architectures = ["LlamaForCausalLM"]  # what the converter and engines detect it by
            config.save_pretrained(tmp)
            generation.save_pretrained(tmp)
        else:
            torch.manual_seed(tiny_cfg.seed)
            model = LlamaForCausalLM(config).to(dtype)
            model.generation_config = generation
            model.save_pretrained(tmp)
            n_params = sum(p.numel() for p in model.parameters())
        save_tokenizer(tokenizer, sp_model, tmp)
    log.info("built tiny base %s: %.1fM parameters, vocab %d", out_dir, n_params / 1e6, len(tokenizer))


def llama_tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """The weights of a LlamaForCausalLM with `config`, by name, in transformers' order."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        shapes |= {
            f"{layer}.self_attn.q_proj.weight": (hidden, hidden),
            f"{layer}.self_attn.k_proj.weight": (kv, hidden),
            f"{layer}.self_attn.v_proj.weight": (kv, hidden),
            f"{layer}.self_attn.o_proj.weight": (hidden, hidden),
            f"{layer}.mlp.gate_proj.weight": (inter, hidden),
            f"{layer}.mlp.up_proj.weight": (inter, hidden),
            f"{layer}.mlp.down_proj.weight": (hidden, inter),
            f"{layer}.input_layernorm.weight": (hidden,),
            f"{layer}.post_attention_layernorm.weight": (hidden,),
        }
    return shapes | {"model.norm.weight": (hidden,), "lm_head.weight": (config.vocab_size, hidden)}


def write_random_shards(config, out_dir: Path, dtype, max_shard_size: str, seed: int) -> int:
    """Random-init weights as transformers initialises a Llama (normal(0, initializer_range) for
    matrices, the padding row zero, ones for the norms), one tensor at a time into shards."""
    import torch

    from pipeline.machine.memory import parse_size
    from pipeline.models.shards import ShardWriter

    generator = torch.Generator().manual_seed(seed)
    writer, total = ShardWriter(out_dir, parse_size(max_shard_size, "model.tiny.max_shard_size")), 0
    for name, shape in llama_tensor_shapes(config).items():
        if len(shape) == 1:
            tensor = torch.ones(shape, dtype=dtype)
        else:
            tensor = torch.empty(shape).normal_(0.0, config.initializer_range, generator=generator).to(dtype)
            if name == "model.embed_tokens.weight" and config.pad_token_id is not None:
                tensor[config.pad_token_id] = 0
        writer.add(name, tensor)
        total += tensor.numel()
    writer.close()
    return total
