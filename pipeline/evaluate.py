"""Greedy answers of a transformers model to the eval set's questions, prompted with `encode_dialog`."""

from __future__ import annotations

import torch

from pipeline.chat import encode_dialog


def eval_prompts(rows: list[dict], limit: int | None = None) -> list[tuple[list[dict], str]]:
    """(prompt messages, expected substring) of the eval rows that carry an `expected` answer."""
    checked = [(row["messages"][:-1], row["expected"]) for row in rows if row.get("expected")]
    return checked[:limit] if limit else checked


@torch.no_grad()
def answer_accuracy(
    model, tokenizer, rows: list[dict], max_new_tokens: int, limit: int | None = None
) -> dict:
    prompts = eval_prompts(rows, limit)
    if not prompts:
        return {"accuracy": None, "checked": 0, "reason": "no eval row carries an expected answer"}
    model.eval()
    correct, stopped, samples = 0, 0, []
    for messages, expected in prompts:
        ids = torch.tensor([encode_dialog(messages, tokenizer)])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[0, ids.shape[1] :].tolist()
        stopped += tokenizer.eos_token_id in out
        reply = tokenizer.decode(out, skip_special_tokens=True)
        correct += expected in reply
        if len(samples) < 3:
            samples.append({"question": messages[-1]["content"], "expected": expected, "reply": reply})
    return {
        "accuracy": correct / len(prompts),
        "stopped_on_eos": stopped / len(prompts),
        "checked": len(prompts),
        "samples": samples,
    }
