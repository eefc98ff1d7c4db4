"""Data stage: chats in, `run_dir/data/{train,eval}.jsonl` out, one `{"messages": [...]}` per line.

guanaco rows are `### Human: ... ### Assistant: ...` texts (a `text` field, or `input` + `output`
as in the OpenAssistant eval file); they become alternating user/assistant messages.
`experiment=tiny` uses a generated fact-recall task instead (`pipeline.synthetic`).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterator
from pathlib import Path

from pipeline.chat import DialogError, check_dialog
from pipeline.errors import DataError
from pipeline.io import atomic_dir
from pipeline.layout import RunDir
from pipeline.rows import read_rows, write_jsonl

log = logging.getLogger(__name__)

TURN_MARKER = re.compile(r"### (Human|Assistant):")
ROLE_OF_MARKER = {"Human": "user", "Assistant": "assistant"}


def parse_guanaco_text(text: str) -> list[dict[str, str]]:
    """`### Human: a ### Assistant: b ### Human: c ...` -> alternating messages."""
    parts = TURN_MARKER.split(text)
    if parts[0].strip():
        raise ValueError(f"text before the first '### Human:': {parts[0].strip()[:60]!r}")
    messages = [
        {"role": ROLE_OF_MARKER[marker], "content": content.strip()}
        for marker, content in zip(parts[1::2], parts[2::2])
    ]
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no '### Assistant:' turn")
    if messages[-1]["role"] != "assistant":
        raise ValueError("the text ends with a '### Human:' turn and no answer")
    if any(not m["content"] for m in messages):
        raise ValueError("an empty turn")
    return messages


def row_to_messages(row: dict, system_prompt: str | None) -> list[dict[str, str]]:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if isinstance(row.get("input"), str) and isinstance(row.get("output"), str):
        text = row["input"] + " " + row["output"]  # the OpenAssistant eval file also has a prompt-only `text`
    elif isinstance(row.get("text"), str):
        text = row["text"]
    else:
        raise ValueError("missing field: expected 'text', or 'input' and 'output' (strings)")
    messages = parse_guanaco_text(text)
    if system_prompt is not None:
        messages = [{"role": "system", "content": system_prompt}] + messages
    check_dialog(messages)  # alternation, and no turn-boundary text inside a message
    return messages


def read_hub_rows(hub_id: str, split: str) -> Iterator[tuple[str, dict]]:
    import datasets

    for index, row in enumerate(datasets.load_dataset(hub_id, split=split)):
        yield f"{hub_id}[{split}] row {index}", row


def load_dialogs(cfg) -> tuple[list[list[dict]], dict]:
    """Parse every row; bad rows fail with their location, or are skipped and counted."""
    source = read_rows(Path(cfg.path)) if cfg.path else read_hub_rows(cfg.hub_id, cfg.hub_split)
    dialogs, skipped = [], []
    for location, row in source:
        try:
            if isinstance(row, Exception):
                raise ValueError(f"malformed JSON line: {row}")
            dialogs.append(row_to_messages(row, cfg.system_prompt))
        except (ValueError, DialogError) as err:
            if cfg.on_bad_row == "error":
                raise DataError(f"{location}: {err} (data.on_bad_row=skip skips bad rows)") from err
            skipped.append(f"{location}: {err}")
    for line in skipped[:10]:
        log.warning("skipped %s", line)
    if not dialogs:
        raise DataError(f"{cfg.path or cfg.hub_id}: no usable rows (dataset is empty or every row is bad)")
    return dialogs, {"rows_read": len(dialogs) + len(skipped), "rows_skipped": len(skipped)}


def split_train_eval(dialogs: list, eval_fraction: float, max_eval_rows: int, seed: int) -> tuple[list, list]:
    order = list(range(len(dialogs)))
    random.Random(seed).shuffle(order)
    n_eval = min(max_eval_rows, round(len(dialogs) * eval_fraction)) if len(dialogs) > 1 else 0
    eval_ids = set(order[:n_eval])
    train = [d for i, d in enumerate(dialogs) if i not in eval_ids]
    evals = [d for i, d in enumerate(dialogs) if i in eval_ids]
    return train, evals


def run(cfg, run_dir: Path) -> dict:
    if cfg.data.synthetic is not None:
        from pipeline.synthetic import make_rows

        train_rows, eval_rows = make_rows(cfg.data.synthetic, cfg.data.system_prompt, cfg.data.seed)
        stats = {"rows_read": len(train_rows) + len(eval_rows), "rows_skipped": 0}
    else:
        dialogs, stats = load_dialogs(cfg.data)
        train, evals = split_train_eval(
            dialogs, cfg.data.eval_fraction, cfg.data.max_eval_rows, cfg.data.seed
        )
        train_rows = [{"messages": d} for d in train]
        eval_rows = [{"messages": d} for d in evals]
    stats.update(train_rows=len(train_rows), eval_rows=len(eval_rows))
    layout = RunDir.of(cfg, run_dir)
    with atomic_dir(layout.data) as tmp:
        write_jsonl(tmp / layout.train_rows.name, train_rows)
        write_jsonl(tmp / layout.eval_rows.name, eval_rows)
    log.info("data: %s", stats)
    return stats
