"""Training and evaluation examples from chat rows: Meta's ids (`pipeline.chat.format.encode_dialog_segments`)
cut to a length limit by one truncation rule, which the train stage and the fidelity ladder share."""

from __future__ import annotations

from pipeline.chat.format import encode_dialog_segments

IGNORE_INDEX = -100  # label of tokens without loss (prompt tokens, padding)


def fitting_exchanges(
    segments: list[tuple[list[int], list[int]]], max_length: int
) -> list[tuple[list[int], list[int]]]:
    """The truncation rule: the longest run of whole (prompt, answer) exchanges from the start that
    fits in `max_length`. An answer is never cut, so every trained answer ends on its EOS; a row
    whose first exchange alone does not fit gives nothing."""
    kept, length = [], 0
    for prompt, answer in segments:
        if length + len(prompt) + len(answer) > max_length:
            break
        kept.append((prompt, answer))
        length += len(prompt) + len(answer)
    return kept


def encode_rows(rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], dict]:
    """input_ids and labels (loss on answers and their EOS only) per row, and what was cut."""
    examples, truncated, dropped = [], 0, 0
    for row in rows:
        segments = encode_dialog_segments(row["messages"], tokenizer)
        kept = fitting_exchanges(segments, max_length)
        if not kept:
            dropped += 1
            continue
        truncated += len(kept) < len(segments)
        input_ids, labels = [], []
        for prompt, answer in kept:
            input_ids += prompt + answer
            labels += [IGNORE_INDEX] * len(prompt) + answer
        examples.append({"input_ids": input_ids, "labels": labels})
    stats = {
        "rows": len(rows),
        "rows_truncated": truncated,
        "rows_dropped": dropped,
        "max_length": max_length,
    }
    return examples, stats
