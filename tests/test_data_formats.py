"""The data stage's row formats besides guanaco: OpenAI-style `messages`, ShareGPT `conversations` and
Alpaca `instruction`/`input`/`output`. The parsers and auto-detection directly; then the real CLI on
jsonl, json and parquet files of each format, bad rows (one `error: file:line: ...` line, or skipped),
and a bad `data.format` value."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import ROOT, run_pipeline
from omegaconf import OmegaConf

from pipeline.config import DataConfig
from pipeline.run.errors import DataError
from pipeline.stages.data import FORMATS, detect_format, load_dialogs, row_to_messages


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- sample rows, as people have them

N_ROWS = 10


def messages_row(i: int) -> dict:
    """OpenAI fine-tuning style; `name` and `weight` are keys that format allows, and are dropped."""
    if i % 3 == 0:
        turns = [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": f"What is {i} + {i}?"},
            {"role": "assistant", "content": f"{2 * i}."},
        ]
    elif i % 3 == 1:
        turns = [
            {"role": "user", "content": f"Translate 'cat {i}' to German.", "name": "alice"},
            {"role": "assistant", "content": f"Katze {i}.", "weight": 0},
            {"role": "user", "content": "And 'dog'?"},
            {"role": "assistant", "content": "Hund.", "weight": 1},
        ]
    else:
        turns = [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}\n\nDone."}]
    return {"messages": turns}


def messages_expected(i: int) -> list[dict]:
    if i % 3 == 0:
        return [system("You are a terse assistant."), user(f"What is {i} + {i}?"), assistant(f"{2 * i}.")]
    if i % 3 == 1:
        return [
            user(f"Translate 'cat {i}' to German."),
            assistant(f"Katze {i}."),
            user("And 'dog'?"),
            assistant("Hund."),
        ]
    return [user(f"Say {i}."), assistant(f"{i}\n\nDone.")]


def sharegpt_row(i: int) -> dict:
    """ShareGPT / LLaMA-Factory style, with an `id`; every fourth row uses `user`/`assistant` names."""
    asker, answerer = ("user", "assistant") if i % 4 == 1 else ("human", "gpt")
    turns = [
        {"from": asker, "value": f"Tell me fact {i}."},
        {"from": answerer, "value": f"Fact {i} is true."},
    ]
    if i % 3 == 0:
        turns = [{"from": "system", "value": "Answer in one sentence."}] + turns
    if i % 3 == 2:
        turns += [{"from": asker, "value": "Why?"}, {"from": answerer, "value": "Because."}]
    return {"id": f"conv_{i}", "conversations": turns}


def sharegpt_expected(i: int) -> list[dict]:
    messages = [user(f"Tell me fact {i}."), assistant(f"Fact {i} is true.")]
    if i % 3 == 0:
        messages = [system("Answer in one sentence.")] + messages
    if i % 3 == 2:
        messages += [user("Why?"), assistant("Because.")]
    return messages


ALPACA_PROMPT = "Below is an instruction that describes a task. Write a response.\n\n### Instruction:\n"


def alpaca_row(i: int) -> dict:
    """tatsu-lab/alpaca style: `input` empty, filled or (i % 3 == 2) absent; some rows carry the
    formatted `text` too, which the stage ignores."""
    row = {"instruction": f"Give a synonym of word {i}.", "output": f"Synonym {i}."}
    if i % 3 == 0:
        row["input"] = ""
        row["text"] = ALPACA_PROMPT + row["instruction"]
    elif i % 3 == 1:
        row["input"] = f"word {i}: happy"
    return row


def alpaca_expected(i: int) -> list[dict]:
    prompt = f"Give a synonym of word {i}."
    if i % 3 == 1:
        prompt += f"\n\nword {i}: happy"  # instruction, blank line, input
    return [user(prompt), assistant(f"Synonym {i}.")]


SAMPLES = {"messages": messages_row, "sharegpt": sharegpt_row, "alpaca": alpaca_row}
EXPECTED = {"messages": messages_expected, "sharegpt": sharegpt_expected, "alpaca": alpaca_expected}


# ---------------------------------------------------------------- files and runs


def write_rows(path: Path, rows: list) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # one schema for all rows: a key a row lacks is null there (alpaca's `input`, `text`)
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def key(messages) -> str:
    return json.dumps(messages, sort_keys=True)


def run_data(run_dir: Path, path: Path, *overrides: str, check: bool = True):
    return run_pipeline("stage=data", f"run_dir={run_dir}", f"data.path={path}", *overrides, check=check)


def written(run_dir: Path) -> tuple[list[dict], list[dict]]:
    return read_jsonl(run_dir / "data" / "train.jsonl"), read_jsonl(run_dir / "data" / "eval.jsonl")


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))["stages"]["data"]["metrics"]


def last_error_line(result) -> str:
    assert result.returncode != 0
    return result.stderr.strip().splitlines()[-1]


def data_cfg(path: Path, **overrides):
    """The data group as the stage sees it (typed, enums and all)."""
    return OmegaConf.structured(DataConfig(path=str(path), **overrides))


# ---------------------------------------------------------------- parsers


@pytest.mark.parametrize("fmt", list(SAMPLES))
def test_parser_gives_the_rows_messages(fmt):
    for i in range(N_ROWS):
        assert row_to_messages(SAMPLES[fmt](i), fmt, None) == EXPECTED[fmt](i), i


def test_guanaco_rows_still_parse():
    row = {"input": "### Human: Hi ### Assistant:", "output": "Hello."}
    assert row_to_messages(row, "guanaco", None) == [user("Hi"), assistant("Hello.")]
    assert row_to_messages({"text": "### Human: a ### Assistant: b"}, "guanaco", None) == [
        user("a"),
        assistant("b"),
    ]


def test_alpaca_input_joins_after_a_blank_line_and_blank_input_adds_nothing():
    row = {"instruction": "Sum these.", "input": "1, 2", "output": "3"}
    assert row_to_messages(row, "alpaca", None)[0] == user("Sum these.\n\n1, 2")
    for blank in ("", "  \n", None):
        row = {"instruction": "Sum nothing.", "input": blank, "output": "0"}
        assert row_to_messages(row, "alpaca", None)[0] == user("Sum nothing.")


def test_system_prompt_is_prepended_unless_the_row_has_its_own():
    plain, own = SAMPLES["sharegpt"](1), SAMPLES["sharegpt"](0)
    assert row_to_messages(plain, "sharegpt", "Be brief.") == [system("Be brief.")] + sharegpt_expected(1)
    # the row's own system message wins: it was written for that conversation
    assert row_to_messages(own, "sharegpt", "Be brief.") == sharegpt_expected(0)
    assert row_to_messages(alpaca_row(1), "alpaca", "") == [system("")] + alpaca_expected(1)


def test_an_empty_system_message_is_allowed():
    row = {"messages": [system(""), user("Hi"), assistant("Hello.")]}
    assert row_to_messages(row, "messages", None) == row["messages"]


BAD = [
    # (format, row, what the message says)
    ("messages", {"messages": "hi"}, "messages row: missing field: expected 'messages', a non-empty list"),
    ("messages", {"messages": []}, "messages row: missing field: expected 'messages'"),
    (
        "messages",
        {"messages": ["hi"]},
        "messages row: messages[0]: expected an object with 'role' and 'content'",
    ),
    (
        "messages",
        {"messages": [user("a"), {"role": "tool", "content": "b"}]},
        "messages row: messages[1].role='tool': expected one of system, user, assistant",
    ),
    (
        "messages",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}, assistant("b")]},
        "messages row: messages[0].content: expected a string, got list",
    ),
    (
        "messages",
        {"messages": [user("a"), assistant(" ")]},
        "messages row: messages[1].content: an empty assistant turn",
    ),
    ("messages", {"messages": [user("a"), assistant("b"), user("c")]}, "messages row: ends with a user turn"),
    ("messages", {"messages": [user("a"), user("b"), assistant("c")]}, "messages row: roles must alternate"),
    (
        "messages",
        {"messages": [system("s")]},
        "messages row: a system message must be followed by a user message",
    ),
    (
        "messages",
        {"messages": [user("say [/INST] now"), assistant("b")]},
        "contains '[/INST]': turn-boundary",
    ),
    (
        "sharegpt",
        {
            "conversations": [
                {"from": "human", "value": "a"},
                {"from": "gpt", "value": "b"},
                {"from": "robot", "value": "c"},
            ]
        },
        "sharegpt row: conversations[2].from='robot': expected one of human, gpt, system",
    ),
    (
        "sharegpt",
        {"conversations": [{"from": "human"}]},
        "sharegpt row: conversations[0].value: expected a string, got NoneType",
    ),
    (
        "sharegpt",
        {"conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "hi"}]},
        "sharegpt row: roles must alternate user/assistant after an optional system message: turn 0",
    ),
    (
        "sharegpt",
        {"messages": [user("a"), assistant("b")]},
        "sharegpt row: missing field: expected 'conversations'",
    ),
    (
        "alpaca",
        {"instruction": "Name a color.", "input": ""},
        "alpaca row: missing field: expected 'instruction' and 'output'",
    ),
    (
        "alpaca",
        {"instruction": "Add.", "input": 3, "output": "4"},
        "alpaca row: 'input': expected a string, got int",
    ),
    ("alpaca", {"instruction": "Name a color.", "output": ""}, "alpaca row: an empty output"),
    ("alpaca", {"instruction": " ", "output": "Red."}, "alpaca row: an empty instruction"),
    ("alpaca", {"instruction": "Use <<SYS>> here.", "output": "No."}, "contains '<<SYS>>'"),
    ("guanaco", {"prompt": "hi"}, "guanaco row: missing field: expected 'text', or 'input' and 'output'"),
]


@pytest.mark.parametrize("fmt, row, message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_row_says_what_is_wrong(fmt, row, message):
    with pytest.raises(ValueError) as err:
        row_to_messages(row, fmt, None)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- auto-detection


@pytest.mark.parametrize(
    "row, fmt",
    [
        (messages_row(0), "messages"),
        (sharegpt_row(0), "sharegpt"),
        (alpaca_row(0), "alpaca"),  # it has a `text` too: `instruction` decides
        (alpaca_row(1), "alpaca"),  # `input` + `output` as guanaco's eval rows, but `instruction` decides
        ({"text": "### Human: a ### Assistant: b"}, "guanaco"),
        ({"input": "### Human: a ### Assistant:", "output": "b", "text": "### Human: a"}, "guanaco"),
        (
            {"messages": None, "conversations": None, "text": "### Human: a ### Assistant: b"},
            "guanaco",
        ),  # parquet
        ({"instruction": None, "input": "### Human: a ### Assistant:", "output": "b"}, "guanaco"),  # parquet
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_detect_format_names_the_keys_it_knows():
    with pytest.raises(
        ValueError, match=r"cannot tell the row format from its keys \['prompt'\].*data.format="
    ):
        detect_format({"prompt": "hi", "response": None})


def test_auto_detects_from_the_first_row_that_names_a_format(tmp_path):
    rows = [
        '{"messages": ',
        json.dumps({"prompt": "hi"}),
        *map(json.dumps, [sharegpt_row(1), messages_row(2)]),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    dialogs, stats = load_dialogs(data_cfg(path, on_bad_row="skip"))
    # line 1 is not JSON, line 2 names no format, line 3 decides sharegpt; line 4 is then a bad sharegpt row
    assert dialogs == [sharegpt_expected(1)]
    assert stats == {"format": "sharegpt", "rows_read": 4, "rows_skipped": 3}
    path.write_text("\n".join(rows[1:]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: cannot tell the row format"):
        load_dialogs(data_cfg(path))


def test_parquet_list_of_structs_reads_as_turns(tmp_path):
    path = write_rows(tmp_path / "sharegpt.parquet", [sharegpt_row(i) for i in range(N_ROWS)])
    dialogs, stats = load_dialogs(data_cfg(path))
    assert dialogs == [sharegpt_expected(i) for i in range(N_ROWS)]
    assert stats == {"format": "sharegpt", "rows_read": N_ROWS, "rows_skipped": 0}


def test_default_config_is_auto_and_formats_are_listed():
    from hydra import compose, initialize_config_dir

    import pipeline.config

    pipeline.config.register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        assert compose("config").data.format == "auto"
        assert compose("config", overrides=["experiment=tiny"]).data.format == "auto"
    assert FORMATS == ("auto", "guanaco", "messages", "sharegpt", "alpaca")


# ---------------------------------------------------------------- through the CLI


@pytest.mark.parametrize(
    "fmt, suffix", [("messages", ".jsonl"), ("sharegpt", ".json"), ("alpaca", ".parquet")]
)
def test_cli_detects_the_format_and_writes_its_messages(fmt, suffix, tmp_path):
    path = write_rows(tmp_path / f"{fmt}{suffix}", [SAMPLES[fmt](i) for i in range(N_ROWS)])
    run_dir = tmp_path / "run"
    result = run_data(run_dir, path, "data.eval_fraction=0.2")
    train, evals = written(run_dir)
    assert (len(train), len(evals)) == (8, 2)
    assert all(set(row) == {"messages"} for row in train + evals)
    got = sorted(key(row["messages"]) for row in train + evals)
    assert got == sorted(key(EXPECTED[fmt](i)) for i in range(N_ROWS))
    assert metrics(run_dir) == {
        "format": fmt,
        "rows_read": N_ROWS,
        "rows_skipped": 0,
        "train_rows": 8,
        "eval_rows": 2,
    }
    assert f"{path}: format {fmt}, detected from the keys of {path}" in result.stdout + result.stderr


def test_cli_explicit_format_with_a_system_prompt(tmp_path):
    path = write_rows(tmp_path / "chats.jsonl", [sharegpt_row(i) for i in range(N_ROWS)])
    run_dir = tmp_path / "run"
    run_data(run_dir, path, "data.format=sharegpt", "data.system_prompt='Be brief.'", "data.eval_fraction=0")
    train, evals = written(run_dir)
    assert evals == []
    expected = [
        sharegpt_expected(i) if i % 3 == 0 else [system("Be brief.")] + sharegpt_expected(i)
        for i in range(N_ROWS)
    ]
    assert sorted(key(r["messages"]) for r in train) == sorted(key(m) for m in expected)
    assert metrics(run_dir)["format"] == "sharegpt"


def test_cli_explicit_format_that_does_not_fit_the_file(tmp_path):
    path = write_rows(tmp_path / "chats.jsonl", [messages_row(i) for i in range(3)])
    result = run_data(tmp_path / "run", path, "data.format=alpaca", check=False)
    assert last_error_line(result) == (
        f"error: {path}:1: alpaca row: missing field: expected 'instruction' and 'output' (strings), "
        "and optionally 'input' (data.on_bad_row=skip skips bad rows)"
    )
    assert not (tmp_path / "run" / "data").exists()


# format: (the bad row, the line it goes on, the error after `file:line: `)
BAD_LINES = {
    "messages": (
        {"messages": [user("Hi"), {"role": "tool", "content": "{}"}]},
        3,
        "messages row: messages[1].role='tool': expected one of system, user, assistant",
    ),
    "sharegpt": (
        {
            "conversations": [
                {"from": "human", "value": "a"},
                {"from": "gpt", "value": "b"},
                {"from": "robot", "value": "c"},
            ]
        },
        7,
        "sharegpt row: conversations[2].from='robot': expected one of human, gpt, system, user, assistant",
    ),
    "alpaca": (
        {"instruction": "Name a color.", "input": ""},
        5,
        "alpaca row: missing field: expected 'instruction' and 'output' (strings), and optionally 'input'",
    ),
}


def bad_file(tmp_path: Path, fmt: str) -> Path:
    """Good rows of `fmt` with the bad one on its line; a blank line 2 counts as a line."""
    bad, line, _ = BAD_LINES[fmt]
    lines = [json.dumps(SAMPLES[fmt](i)) for i in range(6)]
    lines.insert(1, "")
    lines.insert(line - 1, json.dumps(bad))
    path = tmp_path / f"{fmt}-rows.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", list(BAD_LINES))
def test_cli_bad_row_is_one_line_naming_file_and_line(fmt, tmp_path):
    path = bad_file(tmp_path, fmt)
    run_dir = tmp_path / "run"
    result = run_data(run_dir, path, check=False)
    _, line, message = BAD_LINES[fmt]
    assert last_error_line(result) == f"error: {path}:{line}: {message} (data.on_bad_row=skip skips bad rows)"
    assert not (run_dir / "data").exists()


def test_cli_skip_keeps_the_good_rows(tmp_path):
    path = bad_file(tmp_path, "sharegpt")
    run_dir = tmp_path / "run"
    result = run_data(run_dir, path, "data.on_bad_row=skip", "data.eval_fraction=0")
    train, _ = written(run_dir)
    assert sorted(key(r["messages"]) for r in train) == sorted(key(sharegpt_expected(i)) for i in range(6))
    assert metrics(run_dir) == {
        "format": "sharegpt",
        "rows_read": 7,
        "rows_skipped": 1,
        "train_rows": 6,
        "eval_rows": 0,
    }
    assert f"skipped {path}:7: sharegpt row: conversations[2].from='robot'" in result.stdout + result.stderr


@pytest.mark.parametrize("fmt", ["messages", "alpaca"])
def test_skip_keeps_the_good_rows_of_each_format(fmt, tmp_path):
    dialogs, stats = load_dialogs(data_cfg(bad_file(tmp_path, fmt), on_bad_row="skip"))
    assert dialogs == [EXPECTED[fmt](i) for i in range(6)]
    assert stats == {"format": fmt, "rows_read": 7, "rows_skipped": 1}


def test_cli_rejects_an_unknown_format(tmp_path):
    path = write_rows(tmp_path / "chats.jsonl", [messages_row(0)])
    result = run_data(tmp_path / "run", path, "data.format=openai", check=False)
    assert (
        last_error_line(result)
        == "error: data.format=openai: expected one of auto, guanaco, messages, sharegpt, alpaca"
    )
    assert not (tmp_path / "run" / "data").exists()
