"""Greedy answers of a transformers model to the eval set's questions, prompted with `encode_dialog`."""

from __future__ import annotations

import torch

from pipeline.chat.format import encode_dialog
from pipeline.models.load import input_device


def eval_prompts(rows: list[dict], limit: int | None = None) -> list[tuple[list[dict], str]]:
    """(prompt messages, expected substring) of the eval rows that carry an `expected` answer."""
    checked = [(row["messages"][:-1], row["expected"]) for row in rows if row.get("expected")]
    return checked[:limit] if limit else checked


@torch.no_grad()
def answer_accuracy(
    model, tokenizer, rows: list[dict], max_new_tokens: int, limit: int | None = None, batch_size: int = 16
) -> dict:
    """Greedy answers, `batch_size` prompts per `generate` call (left-padded, so every answer starts
    right after its prompt): the eval costs a few forward passes per batch, not per row."""
    prompts = eval_prompts(rows, limit)
    if not prompts:
        return {"accuracy": None, "checked": 0, "reason": "no eval row carries an expected answer"}
    model.eval()
    correct, stopped, samples = 0, 0, []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        encoded = [encode_dialog(messages, tokenizer) for messages, _ in batch]
        width = max(len(ids) for ids in encoded)
        pad = tokenizer.pad_token_id
        # On the model's device: a model wholly on one GPU gets no automatic input placement.
        input_ids = torch.tensor(
            [[pad] * (width - len(ids)) + ids for ids in encoded], device=input_device(model)
        )
        attention_mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=input_device(model)
        )
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )[:, width:].tolist()
        for (messages, expected), answer in zip(batch, out):
            if tokenizer.eos_token_id in answer:
                answer = answer[: answer.index(tokenizer.eos_token_id) + 1]
                stopped += 1
            reply = tokenizer.decode(answer, skip_special_tokens=True)
            correct += expected in reply
            if len(samples) < 3:
                samples.append({"question": messages[-1]["content"], "expected": expected, "reply": reply})
    return {
        "accuracy": correct / len(prompts),
        "stopped_on_eos": stopped / len(prompts),
        "checked": len(prompts),
        "samples": samples,
    }
