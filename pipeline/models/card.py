"""The model card (`merged/README.md`): what the model is, how it was made and checked, how to serve it."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

CARD = """---
base_model: {base_id}
library_name: transformers
tags: [llama-2, qlora, sft]
---
# {name}

{base_id} fine-tuned with QLoRA on `{data}`, LoRA merged into the weights (`merge.base={mode}`, {dtype}).
Chat format: Llama-2 (`[INST] ... [/INST]`, optional `<<SYS>>` block), written into `tokenizer_config.json`
as `chat_template`; rendered and tokenized it gives the same token ids as Meta's `chat_completion`.

## Recipe
```yaml
{recipe}
```

## Training
{train}

## Merge fidelity (eval set, assistant tokens; reference: the 4-bit base + adapter as trained)
| artifact | KL/token | max abs dlogit | top-1 agreement | perplexity |
|---|---|---|---|---|
{fidelity}

Self-check: {check}

## Serve
TGI (reads `chat_template` from `tokenizer_config.json`; the template emits BOS itself):
```
docker run --rm -p 8080:80 -v $PWD:/model \\
  ghcr.io/huggingface/text-generation-inference:3.3.5 --model-id /model
```
llama.cpp: convert with `python -m pipeline stage=convert` (or llama.cpp's `convert_hf_to_gguf.py`); the GGUF
carries the same template, and llama.cpp's own `llama-server -m model.gguf` (Jinja on, its default) uses
it for `/v1/chat/completions`, as does `python -m llama_cpp.server --model model.gguf`. Not `--no-jinja` or
`--chat-template llama2`: llama.cpp's built-in Llama-2 layouts are not Meta's (measured).
Do not add BOS yourself to a prompt rendered with the template: it is already there.
The pipeline converts, quantizes and serves with one llama.cpp: commit {llama_cpp_commit}, the tree that
llama-cpp-python {llama_cpp_python} vendors.
"""


def _row(name: str, f: dict) -> str:
    def fmt(key):
        return f"{f[key]:.4g}" if isinstance(f.get(key), (int, float)) else "-"

    cells = [fmt(key) for key in ("kl_per_token", "max_abs_logit_diff", "top1_agreement", "perplexity")]
    return f"| {name} | {' | '.join(cells)} |"


def write_model_card(out_dir: Path, cfg, train_metrics_path: Path, merge_metrics: dict) -> None:
    train = json.loads(train_metrics_path.read_text()) if train_metrics_path.is_file() else {}
    summary = {k: train.get(k) for k in ("steps", "train_tokens_per_s")}
    accuracy = (train.get("answer_accuracy_trained") or {}).get("accuracy")
    if accuracy is not None:
        summary["eval_answer_accuracy"] = accuracy
    curve = train.get("loss_curve") or []
    if curve:
        summary["final_loss"] = curve[-1]["loss"]
    from pipeline.engines.llamacpp import LLAMA_CPP_COMMIT, LLAMA_CPP_PYTHON

    card = CARD.format(
        llama_cpp_commit=LLAMA_CPP_COMMIT,
        llama_cpp_python=LLAMA_CPP_PYTHON,
        base_id=cfg.model.name_or_path or "tiny local Llama (model=tiny)",
        name=f"{cfg.model.name}-{cfg.data.name}-qlora-merged",
        data=cfg.data.hub_id or cfg.data.path or cfg.data.name,
        mode=merge_metrics["mode"],
        dtype=merge_metrics["dtype"],
        recipe=OmegaConf.to_yaml({"train": OmegaConf.to_container(cfg.train, resolve=True)}).strip(),
        train=", ".join(f"{k}: {v}" for k, v in summary.items()),
        fidelity="\n".join(_row(name, f) for name, f in merge_metrics["fidelity"].items()),
        check=(
            f"max abs dlogit {merge_metrics['self_check']['max_abs_logit_diff']:.3g} against the "
            f"{merge_metrics['self_check']['reference']} "
            f"(allowed {merge_metrics['self_check']['max_abs_logit_diff_allowed']})"
        ),
    )
    (out_dir / "README.md").write_text(card, encoding="utf-8")


# llama.cpp's published figures for Llama-2-7B against its F16 (examples/perplexity/README.md of
# llama.cpp, wikitext-2): a real 7B, unlike the tiny models of this project's tests.
LLAMA2_7B_ANCHORS = {"Q8_0": (0.0040, 0.00037), "Q6_K": (0.0139, 0.0021), "Q4_K_M": (0.0825, 0.0127)}

GGUF_CARD = """---
base_model: {base_id}
library_name: gguf
tags: [llama-2, qlora, gguf, llama.cpp]
---
# {name} GGUF

GGUF files of `{name}`, converted and quantized with llama.cpp {commit} (the tree llama-cpp-python
{bindings} vendors). Each carries the Llama-2 chat template in `tokenizer.chat_template`; llama.cpp's
`llama-server` (Jinja on, its default) renders it to Meta's token ids.

## Which file: measured against the F16 GGUF
On {rows} held-out chat rows ({tokens} assistant tokens, the ids training saw; never used for training
or calibration). KL: KL divergence of the next-token distribution from the F16 GGUF's, per token.

| artifact | size | KL mean | KL p99 | top-1 vs F16 | PPL | dPPL | imatrix |
|---|---|---|---|---|---|---|---|
{rows_table}

Importance matrix: llama.cpp's `llama-imatrix` over {imatrix_source}. With vs without it, per type
(KL mean, lower is closer to F16):

| type | with imatrix | without | shipped |
|---|---|---|---|
{imatrix_table}

## Anchors: llama.cpp's published Llama-2-7B figures (not this model)
| quant | dPPL | KL mean |
|---|---|---|
{anchors}

These are a real Llama-2-7B on wikitext-2. A small model, above all a random-init test model, is
not Llama-2-7B and its figures are not comparable in size. On the real 7B recipe the ladder should
show the same order: Q8_0 near zero, Q6_K about 0.002 KL, Q4_K_M about 0.01, and the imatrix
lowering KL of the 4- and 3-bit types.
"""


def _size(n) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def gguf_card(cfg, ladder: dict) -> str:
    from pipeline.engines.llamacpp import LLAMA_CPP_COMMIT, LLAMA_CPP_PYTHON

    rungs = ladder["rungs"]
    rows = "\n".join(
        f"| {name} | {_size(f['size_bytes'])} | {f['kl_mean']:.5f} | {f['kl_p99']:.5f} | "
        f"{f['top1_agreement']:.4f} | {f['perplexity']:.3f} | {f['delta_perplexity']:+.4f} | "
        f"{'yes' if f.get('imatrix') else '-'} |"
        for name, f in rungs.items()
    )
    imatrix = ladder["imatrix"]
    comparison = "\n".join(
        f"| {t} | {c['kl_mean_with']:.5f} | {c['kl_mean_without']:.5f} | {c['shipped']} |"
        for t, c in imatrix["comparison"].items()
    )
    anchors = "\n".join(f"| {q} | {d:.4f} | {k:.5f} |" for q, (d, k) in LLAMA2_7B_ANCHORS.items())
    return GGUF_CARD.format(
        base_id=cfg.model.name_or_path or "tiny local Llama (model=tiny)",
        name=f"{cfg.model.name}-{cfg.data.name}-qlora",
        commit=LLAMA_CPP_COMMIT[:9],
        bindings=LLAMA_CPP_PYTHON,
        rows=ladder["rows"],
        tokens=next(iter(rungs.values()))["tokens"],
        rows_table=rows,
        imatrix_source="the training rows in the chat format"
        if imatrix["types"]
        else "(off: export.imatrix.types=[])",
        imatrix_table=comparison or "| - | - | - | - |",
        anchors=anchors,
    )
