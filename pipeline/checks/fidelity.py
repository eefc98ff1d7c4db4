"""How closely one artifact follows another: next-token distributions on the eval set's assistant tokens.

Every artifact (4-bit base + adapter, merged safetensors, each GGUF) is run on the same eval
dialogs, encoded with `pipeline.chat.format.encode_dialog_segments`; only positions that predict an
assistant token (or the EOS closing an answer) are compared, which is what training optimised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.chat.examples import fitting_exchanges
from pipeline.chat.format import encode_dialog_segments


@dataclass
class EvalSequence:
    input_ids: list[int]
    targets: list[int]  # positions t whose logits predict input_ids[t + 1], an assistant token


def eval_sequences(rows: list[dict], tokenizer, max_rows: int, max_length: int) -> list[EvalSequence]:
    sequences = []
    for row in rows:
        ids, targets = [], []
        for prompt, answer in fitting_exchanges(
            encode_dialog_segments(row["messages"], tokenizer), max_length
        ):
            ids += prompt
            targets += range(len(ids) - 1, len(ids) - 1 + len(answer))
            ids += answer
        if targets:
            sequences.append(EvalSequence(ids, targets))
        if len(sequences) == max_rows:
            break
    return sequences


def hf_logits(model, sequences: list[EvalSequence]) -> list[np.ndarray]:
    """float32 logits [targets, vocab] of a transformers (or peft) model."""
    import torch

    from pipeline.models.load import input_device

    model.eval()
    out = []
    with torch.no_grad():
        for seq in sequences:
            # On the model's device (a model wholly on one GPU gets no automatic input placement).
            logits = model(input_ids=torch.tensor([seq.input_ids], device=input_device(model))).logits[0]
            out.append(logits[seq.targets].float().cpu().numpy())
    return out


def llamacpp_logits(
    gguf_path, sequences: list[EvalSequence], n_threads: int | None = None
) -> list[np.ndarray]:
    """float32 logits [targets, vocab] computed by llama.cpp from a GGUF."""
    from pipeline.engines.gguf import open_llama

    n_ctx = max(len(s.input_ids) for s in sequences)
    llama = open_llama(gguf_path, n_ctx=max(n_ctx, 64), logits_all=True, n_threads=n_threads, seed=0)
    try:
        out = []
        for seq in sequences:
            llama.reset()
            llama.eval(seq.input_ids)
            out.append(np.array(llama.scores[: len(seq.input_ids)][seq.targets], dtype=np.float32))
        return out
    finally:
        llama.close()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def perplexity(logits: list[np.ndarray], sequences: list[EvalSequence]) -> float:
    nll, count = 0.0, 0
    for lg, seq in zip(logits, sequences):
        labels = [seq.input_ids[t + 1] for t in seq.targets]
        logp = _log_softmax(lg)
        nll -= float(logp[np.arange(len(labels)), labels].sum())
        count += len(labels)
    return math.exp(nll / count)


def compare(logits: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    """KL(reference || logits) per token, max |dlogit|, and top-1 agreement with the reference."""
    kl, max_diff, agree, count = 0.0, 0.0, 0, 0
    for lg, ref in zip(logits, reference):
        lp, lq = _log_softmax(ref.astype(np.float64)), _log_softmax(lg.astype(np.float64))
        kl += float((np.exp(lp) * (lp - lq)).sum())
        max_diff = max(max_diff, float(np.abs(lg - ref).max()))
        agree += int((lg.argmax(-1) == ref.argmax(-1)).sum())
        count += len(lg)
    return {
        "kl_per_token": kl / count,
        "max_abs_logit_diff": max_diff,
        "top1_agreement": agree / count,
        "tokens": count,
    }


def kl_divergences(logits: list[np.ndarray], reference: list[np.ndarray]) -> np.ndarray:
    """KL(reference || artifact) of the next-token distribution at every compared position, as
    `llama-perplexity --kl-divergence` computes it (there: over whole chunks; here: assistant tokens)."""
    out = []
    for lg, ref in zip(logits, reference):
        lp, lq = _log_softmax(ref.astype(np.float64)), _log_softmax(lg.astype(np.float64))
        out.append((np.exp(lp) * (lp - lq)).sum(axis=-1))
    return np.concatenate(out) if out else np.zeros(0)


def rung(logits: list[np.ndarray], reference: list[np.ndarray], sequences: list[EvalSequence]) -> dict:
    """One artifact against the reference: mean and 99th-percentile KL, top-1 agreement, perplexity."""
    kl = kl_divergences(logits, reference)
    agree = sum(int((lg.argmax(-1) == ref.argmax(-1)).sum()) for lg, ref in zip(logits, reference))
    return {
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.percentile(kl, 99)),
        "kl_max": float(kl.max()),
        "top1_agreement": agree / len(kl),
        "perplexity": perplexity(logits, sequences),
        "tokens": int(len(kl)),
    }
