"""Data stage: chats in, `run_dir/data/{train,eval}.jsonl` out, one `{"messages": [...]}` per line.

Row formats (`data.format`; `auto` detects it per file, see `detect_format`):
- guanaco: `### Human: ... ### Assistant: ...` texts (a `text` field, or `input` + `output` as in the
  OpenAssistant eval file);
- messages: `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}`, the stage's own output;
- sharegpt: `{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}]}` (`user`/`assistant` too);
- alpaca: `{"instruction": ..., "input": ... (optional), "output": ...}`.
Each becomes alternating user/assistant messages ending with an answer, after an optional system message.
`experiment=tiny` uses a generated fact-recall task instead (`pipeline.chat.synthetic`).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterator
from pathlib import Path

from pipeline.chat.format import ROLES, DialogError, check_dialog
from pipeline.chat.rows import read_rows, write_jsonl
from pipeline.config import DATA_FORMATS
from pipeline.run.errors import DataError
from pipeline.run.io import atomic_dir
from pipeline.run.layout import RunDir

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


def guanaco_messages(row: dict) -> list[dict[str, str]]:
    if isinstance(row.get("input"), str) and isinstance(row.get("output"), str):
        text = row["input"] + " " + row["output"]  # the OpenAssistant eval file also has a prompt-only `text`
    elif isinstance(row.get("text"), str):
        text = row["text"]
    else:
        raise ValueError("missing field: expected 'text', or 'input' and 'output' (strings)")
    return parse_guanaco_text(text)


def turn(item, where: str, role_key: str, content_key: str, roles: dict[str, str]) -> dict[str, str]:
    """One message of a list-of-turns row; `roles` maps the row's role names to the project's."""
    if not isinstance(item, dict):
        raise ValueError(
            f"{where}: expected an object with {role_key!r} and {content_key!r}, got {item!r:.60}"
        )
    role, content = item.get(role_key), item.get(content_key)
    if not isinstance(role, str) or role not in roles:
        raise ValueError(f"{where}.{role_key}={role!r}: expected one of {', '.join(roles)}")
    if not isinstance(content, str):
        raise ValueError(f"{where}.{content_key}: expected a string, got {type(content).__name__}")
    if roles[role] != "system" and not content.strip():  # an empty system prompt is a choice, not a gap
        raise ValueError(f"{where}.{content_key}: an empty {roles[role]} turn")
    return {"role": roles[role], "content": content}


def turns(row: dict, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict]:
    items = row.get(key)
    if not isinstance(items, list) or not items:
        raise ValueError(
            f"missing field: expected {key!r}, a non-empty list of {{{role_key!r}, {content_key!r}}}"
        )
    return [turn(item, f"{key}[{i}]", role_key, content_key, roles) for i, item in enumerate(items)]


def openai_messages(row: dict) -> list[dict[str, str]]:
    return turns(row, "messages", "role", "content", {role: role for role in ROLES})


SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}


def sharegpt_messages(row: dict) -> list[dict[str, str]]:
    return turns(row, "conversations", "from", "value", SHAREGPT_ROLES)


def alpaca_messages(row: dict) -> list[dict[str, str]]:
    instruction, extra, output = row.get("instruction"), row.get("input"), row.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise ValueError(
            "missing field: expected 'instruction' and 'output' (strings), and optionally 'input'"
        )
    if extra is not None and not isinstance(extra, str):
        raise ValueError(f"'input': expected a string, got {type(extra).__name__}")
    if not instruction.strip() or not output.strip():
        raise ValueError(f"an empty {'instruction' if not instruction.strip() else 'output'}")
    # Stanford Alpaca's prompt template puts the input a blank line after the instruction, so we join
    # them with "\n\n" (LLaMA-Factory joins with one "\n"); an empty or missing input adds nothing.
    user = instruction + "\n\n" + extra if extra and extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


PARSERS = {
    "guanaco": guanaco_messages,
    "messages": openai_messages,
    "sharegpt": sharegpt_messages,
    "alpaca": alpaca_messages,
}
FORMATS = ("auto", *PARSERS)
assert FORMATS == DATA_FORMATS, "data.format's values (pipeline/config.py) name the parsers here"


def detect_format(row: dict) -> str:
    """The format a row's keys name, in this order: `messages`, `conversations` (sharegpt),
    `instruction` (alpaca; guanaco's eval file also has `input` + `output`, and Alpaca copies often
    carry a formatted `text` too, so `instruction` decides), then `text` or `input` + `output`
    (guanaco). Keys holding null do not count: parquet gives every row every column."""
    keys = {key for key, value in row.items() if value is not None}
    for key, name in (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca")):
        if key in keys:
            return name
    if "text" in keys or {"input", "output"} <= keys:
        return "guanaco"
    raise ValueError(
        f"cannot tell the row format from its keys {sorted(keys)}: expected 'messages', 'conversations' "
        "(sharegpt), 'instruction' + 'output' (alpaca), or 'text' / 'input' + 'output' (guanaco); "
        "data.format= names it"
    )


def check_utf8(messages: list[dict[str, str]]) -> None:
    """JSON's `\\ud800` escapes decode to lone surrogates, which no UTF-8 file can hold: refuse the row
    here, by its location, rather than fail writing train.jsonl. Every other code point is kept as is."""
    for i, message in enumerate(messages):
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"message {i}: a lone surrogate U+{ord(err.object[err.start]):04X} at character {err.start}: "
                "not a character, cannot be written as UTF-8"
            ) from None


def row_to_messages(row: dict, fmt: str, system_prompt: str | None) -> list[dict[str, str]]:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    try:
        messages = PARSERS[fmt](row)
        check_utf8(messages)
        check_dialog(messages)  # alternation, and no turn-boundary text inside a message
    except ValueError as err:  # DialogError too
        raise ValueError(f"{fmt} row: {err}") from err
    if messages[-1]["role"] != "assistant":
        raise ValueError(
            f"{fmt} row: ends with a {messages[-1]['role']} turn: nothing to learn as the answer"
        )
    # A row's own system message wins over data.system_prompt: it was written for that conversation.
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
        check_dialog(messages)  # the system prompt's own text
    return messages


def read_hub_rows(hub_id: str, split: str) -> Iterator[tuple[str, dict]]:
    import datasets

    for index, row in enumerate(datasets.load_dataset(hub_id, split=split)):
        yield f"{hub_id}[{split}] row {index}", row


def load_dialogs(cfg) -> tuple[list[list[dict]], dict]:
    """Parse every row; bad rows fail with their location, or are skipped and counted."""
    name = cfg.path or cfg.hub_id
    source = read_rows(Path(cfg.path)) if cfg.path else read_hub_rows(cfg.hub_id, cfg.hub_split)
    fmt, dialogs, skipped = str(cfg.format), [], []
    for location, row in source:
        try:
            if isinstance(row, Exception):
                raise ValueError(f"malformed JSON line: {row}")
            if fmt == "auto" and isinstance(row, dict):  # the first row that names its format decides
                fmt = detect_format(row)
                log.info("data: %s: format %s, detected from the keys of %s", name, fmt, location)
            dialogs.append(row_to_messages(row, fmt, cfg.system_prompt))
        except (ValueError, DialogError) as err:
            if cfg.on_bad_row == "error":
                raise DataError(f"{location}: {err} (data.on_bad_row=skip skips bad rows)") from err
            skipped.append(f"{location}: {err}")
    for line in skipped[:10]:
        log.warning("skipped %s", line)
    if not dialogs:
        raise DataError(f"{name}: no usable rows (dataset is empty or every row is bad)")
    return dialogs, {"format": fmt, "rows_read": len(dialogs) + len(skipped), "rows_skipped": len(skipped)}


def conversation_root(dialog: list[dict]) -> str:
    """The first user turn. Guanaco is OpenAssistant trees flattened: the branches of one tree are
    separate rows that share their opening exchange, so rows are split by root, never one by one."""
    return next(m["content"].strip() for m in dialog if m["role"] == "user")


def split_train_eval(dialogs: list, eval_fraction: float, max_eval_rows: int, seed: int) -> tuple[list, list]:
    """Hold out whole conversation trees (see conversation_root) until `n_eval` rows: no eval answer
    or prompt is ever a training row's too."""
    groups: dict[str, list[int]] = {}
    for i, dialog in enumerate(dialogs):
        groups.setdefault(conversation_root(dialog), []).append(i)
    roots = list(groups)
    random.Random(seed).shuffle(roots)
    n_eval = min(max_eval_rows, round(len(dialogs) * eval_fraction)) if len(groups) > 1 else 0
    eval_ids: set[int] = set()
    for root in roots:
        if len(eval_ids) + len(groups[root]) <= n_eval and len(eval_ids) + len(groups[root]) < len(dialogs):
            eval_ids.update(groups[root])
    train = [d for i, d in enumerate(dialogs) if i not in eval_ids]
    evals = [d for i, d in enumerate(dialogs) if i in eval_ids]
    return train, evals


def run(cfg, run_dir: Path) -> dict:
    if cfg.data.synthetic is not None:
        from pipeline.chat.synthetic import make_rows

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
