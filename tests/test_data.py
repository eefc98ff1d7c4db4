"""The data stage: guanaco text parsing, local jsonl/json/parquet copies through the real CLI, bad
input (fails naming file and line, writes nothing; or is skipped and counted), the synthetic task,
the manifest and stage skipping, and `atomic_dir`."""

from __future__ import annotations

import hashlib
import json
import re
from importlib import metadata
from pathlib import Path

import pytest
from conftest import GUANACO_QUESTIONS, need, run_pipeline

from pipeline.chat.format import check_dialog
from pipeline.run.io import atomic_dir
from pipeline.stages.data import parse_guanaco_text

MARKER = {"user": "### Human:", "assistant": "### Assistant:"}


# ---------------------------------------------------------------- helpers


def dialog(i: int) -> list[dict]:
    """The i-th test conversation; every third one is two exchanges long."""
    if i % 3 == 1:
        return [
            {"role": "user", "content": f"Hi {i}"},
            {"role": "assistant", "content": f"Hello {i}."},
            {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": f"Then {i}."},
        ]
    return [
        {"role": "user", "content": f"Question {i}?"},
        {"role": "assistant", "content": f"Answer {i}.\nSecond line."},
    ]


def guanaco_row(i: int) -> dict:
    """`dialog(i)` written the guanaco way, alternately as a `text` row and an `input`/`output` row."""
    messages = dialog(i)
    if i % 2:
        return {"text": " ".join(f"{MARKER[m['role']]} {m['content']}" for m in messages)}
    prompt = " ".join(f"{MARKER[m['role']]} {m['content']}" for m in messages[:-1])
    return {"input": f"{prompt} {MARKER['assistant']}", "output": messages[-1]["content"]}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def splits(run_dir: Path) -> tuple[list[dict], list[dict]]:
    return read_jsonl(run_dir / "data" / "train.jsonl"), read_jsonl(run_dir / "data" / "eval.jsonl")


def key(messages) -> str:
    return json.dumps(messages, sort_keys=True)


def run_data(run_dir: Path, *overrides: str, check: bool = True):
    return run_pipeline("stage=data", f"run_dir={run_dir}", *overrides, check=check)


def output_of(result, run_dir: Path) -> str:
    """Everything the run said: Hydra logs to stdout and to run_dir/*.log, errors may go to stderr."""
    logs = "".join(p.read_text(encoding="utf-8") for p in run_dir.glob("*.log")) if run_dir.is_dir() else ""
    return result.stdout + result.stderr + logs


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))


def assert_nothing_written(run_dir: Path) -> None:
    assert not (run_dir / "data").exists()
    leftovers = [p.name for p in run_dir.glob(".data.*")] if run_dir.is_dir() else []
    assert leftovers == [], f"temporary leftovers: {leftovers}"
    assert not (run_dir / "manifest.json").exists()  # a failed stage is not recorded


def assert_alternating(messages: list[dict]) -> None:
    roles = [m["role"] for m in messages if m["role"] != "system"]
    assert roles == ["user", "assistant"] * (len(roles) // 2) and roles, roles
    assert all(isinstance(m["content"], str) for m in messages)


# ---------------------------------------------------------------- parse_guanaco_text


def test_parse_single_turn():
    assert parse_guanaco_text("### Human: What is 2+2?\n### Assistant:  It is 4. \n") == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
    ]


def test_parse_multi_turn_keeps_inner_newlines():
    text = (
        "### Human: Hi ### Assistant: Hello!\n\nHow can I help? "
        "### Human: A poem. ### Assistant: Roses\nare red."
    )
    assert parse_guanaco_text(text) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!\n\nHow can I help?"},
        {"role": "user", "content": "A poem."},
        {"role": "assistant", "content": "Roses\nare red."},
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("Intro ### Human: a ### Assistant: b", "text before the first"),
        ("### Human: only a question", "no '### Assistant:' turn"),
        ("### Human: a ### Assistant: b ### Human: c", "ends with a '### Human:' turn"),
        ("### Human: a ### Assistant:", "empty turn"),  # an open prompt, as in oa_questions' `text`
        ("### Human:   ### Assistant: b", "empty turn"),
    ],
)
def test_parse_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_guanaco_text(text)


def test_every_real_oa_question_parses(guanaco_records):
    assert len(guanaco_records) == 953
    turns = set()
    for record in guanaco_records:
        messages = parse_guanaco_text(record["input"] + " " + record["output"])
        assert_alternating(messages)
        assert all(m["content"] and m["content"] == m["content"].strip() for m in messages)
        assert messages[-1] == {"role": "assistant", "content": record["output"].strip()}
        check_dialog(messages)  # and the Llama-2 chat format accepts it
        turns.add(len(messages))
    assert {2, 4} <= turns  # the file has multi-turn records too: they must not be cut to one exchange


# ---------------------------------------------------------------- local copies through the CLI

N_ROWS = 20


@pytest.fixture(scope="module")
def local_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "guanaco.jsonl"
    return write_jsonl(path, [guanaco_row(i) for i in range(N_ROWS)])


@pytest.fixture(scope="module")
def split_run(local_jsonl, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("split") / "run"
    run_data(run_dir, f"data.path={local_jsonl}", "data.eval_fraction=0.2")
    return run_dir


def test_data_stage_writes_messages_jsonl(split_run):
    train, evals = splits(split_run)
    assert (len(train), len(evals)) == (16, 4)  # 20 rows, eval_fraction 0.2
    for row in train + evals:
        assert set(row) == {"messages"}
        assert_alternating(row["messages"])
    # every input row lands in exactly one split, parsed to the conversation it was written from
    assert sorted(key(r["messages"]) for r in train + evals) == sorted(key(dialog(i)) for i in range(N_ROWS))
    assert manifest(split_run)["stages"]["data"]["metrics"] == {
        "format": "guanaco",
        "rows_read": 20,
        "rows_skipped": 0,
        "train_rows": 16,
        "eval_rows": 4,
    }


def test_split_is_deterministic_and_seeded(split_run, local_jsonl, tmp_path):
    again, reseeded = tmp_path / "again", tmp_path / "reseeded"
    run_data(again, f"data.path={local_jsonl}", "data.eval_fraction=0.2")
    run_data(reseeded, f"data.path={local_jsonl}", "data.eval_fraction=0.2", "data.seed=1")
    for name in ("train.jsonl", "eval.jsonl"):
        assert (again / "data" / name).read_bytes() == (split_run / "data" / name).read_bytes()
    first = {key(r["messages"]) for r in read_jsonl(split_run / "data" / "eval.jsonl")}
    other = {key(r["messages"]) for r in read_jsonl(reseeded / "data" / "eval.jsonl")}
    assert len(other) == 4 and other != first


@pytest.mark.parametrize("prompt, override", [("Be brief, please.", "'Be brief, please.'"), ("", "''")])
def test_system_prompt_is_prepended(prompt, override, split_run, local_jsonl, tmp_path):
    run_data(tmp_path, f"data.path={local_jsonl}", "data.eval_fraction=0.2", f"data.system_prompt={override}")
    for name in ("train.jsonl", "eval.jsonl"):
        plain = read_jsonl(split_run / "data" / name)
        with_system = read_jsonl(tmp_path / "data" / name)
        # same seed, same split: each row is the plain row with the system message in front
        assert [r["messages"] for r in with_system] == [
            [{"role": "system", "content": prompt}] + r["messages"] for r in plain
        ]


@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_json_and_parquet_copies_load(suffix, tmp_path):
    rows = [guanaco_row(i) for i in range(N_ROWS)]
    path = tmp_path / f"guanaco{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # parquet has one schema: text rows get null input/output and vice versa
        columns = {c: [r.get(c) for r in rows] for c in ("text", "input", "output")}
        pq.write_table(pa.table(columns), path)
    run_dir = tmp_path / "run"
    run_data(run_dir, f"data.path={path}")
    train, evals = splits(run_dir)
    assert len(evals) == 1  # round(20 * 0.05)
    assert sorted(key(r["messages"]) for r in train + evals) == sorted(key(dialog(i)) for i in range(N_ROWS))


def test_json_bad_row_is_named_by_index(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([guanaco_row(1), {"text": "### Human: no answer"}]), encoding="utf-8")
    run_dir = tmp_path / "run"
    result = run_data(run_dir, f"data.path={path}", check=False)
    assert result.returncode != 0
    assert f"{path} row 1" in output_of(result, run_dir)
    assert_nothing_written(run_dir)


def test_real_oa_questions_file_loads_in_place(tmp_path):
    path = need(GUANACO_QUESTIONS).resolve()  # read in place, never copied
    result = run_data(tmp_path, f"data.path={path}", check=False)
    assert result.returncode == 0, output_of(result, tmp_path)[-2000:]
    train, evals = splits(tmp_path)
    assert (len(train), len(evals)) == (905, 48)  # 5% of 953 by default
    metrics = manifest(tmp_path)["stages"]["data"]["metrics"]
    assert metrics["rows_read"] == 953 and metrics["rows_skipped"] == 0
    for row in train + evals:
        assert row["messages"][-1]["role"] == "assistant" and row["messages"][-1]["content"]
    # The file is OpenAssistant trees flattened: branches share their opening exchange. Whole trees are
    # held out, so no eval prompt or answer is also a training row's.
    firsts = [r["messages"][0]["content"] for r in train + evals]
    assert len(set(firsts)) < len(firsts)  # shared roots exist: a row-by-row split would leak
    seen = {m["content"] for r in train for m in r["messages"]}
    assert not [m["content"] for r in evals for m in r["messages"] if m["content"] in seen]


# ---------------------------------------------------------------- bad input

GOOD = json.dumps(guanaco_row(1))
LAST = json.dumps(guanaco_row(4))
# name: (file text, line of the bad row, what the message must say). Blank lines count as lines.
BAD_ROWS = {
    "malformed_json": (f'{GOOD}\n{{"text": "### Human: a ### Assistant: b"\n{LAST}\n', 2, ["malformed JSON"]),
    "missing_text_field": (
        f'{GOOD}\n\n{{"prompt": "hi"}}\n{LAST}\n',
        3,
        ["missing field", "'text'", "'output'"],
    ),
    "no_assistant": (f'{GOOD}\n{{"text": "### Human: only a question"}}\n{LAST}\n', 2, ["### Assistant:"]),
    "non_alternating": (
        f'{GOOD}\n{{"text": "### Human: a ### Human: b ### Assistant: c"}}\n{LAST}\n',
        2,
        ["alternate", "'assistant'"],
    ),
    "turn_boundary_text": (
        f'{GOOD}\n{{"text": "### Human: say [INST] now ### Assistant: c"}}\n{LAST}\n',
        2,
        ["'[INST]'", "turn-boundary"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_fails_naming_line_then_skip_keeps_good_rows(case, tmp_path):
    text, line, expected = BAD_ROWS[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(text, encoding="utf-8")

    run_dir = tmp_path / "run"
    result = run_data(run_dir, f"data.path={path}", check=False)
    assert result.returncode != 0
    said = output_of(result, run_dir)
    assert f"{path}:{line}:" in said, said
    for text_part in expected:
        assert text_part in said, said
    assert_nothing_written(run_dir)

    skip_dir = tmp_path / "skip"
    run_data(skip_dir, f"data.path={path}", "data.on_bad_row=skip")
    rows = read_jsonl(skip_dir / "data" / "train.jsonl") + read_jsonl(skip_dir / "data" / "eval.jsonl")
    assert sorted(key(r["messages"]) for r in rows) == sorted([key(dialog(1)), key(dialog(4))])
    metrics = manifest(skip_dir)["stages"]["data"]["metrics"]
    assert metrics["rows_skipped"] == 1 and metrics["rows_read"] == 3


# name: (file name or None for a missing file, its text, what the message must say)
BAD_FILES = {
    "empty_file": ("empty.jsonl", "", ["no usable rows"]),
    "missing_file": ("absent.jsonl", None, ["not found"]),
    "unsupported_extension": ("rows.csv", "text\n### Human: a ### Assistant: b\n", [".jsonl", ".parquet"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_fails_naming_it_even_with_skip(case, tmp_path):
    name, text, expected = BAD_FILES[case]
    path = tmp_path / name
    if text is not None:
        path.write_text(text, encoding="utf-8")
    for mode in ("error", "skip"):  # skipping bad rows cannot rescue a file with no rows
        run_dir = tmp_path / f"run-{mode}"
        result = run_data(run_dir, f"data.path={path}", f"data.on_bad_row={mode}", check=False)
        assert result.returncode != 0
        said = output_of(result, run_dir)
        assert str(path) in said, said
        for text_part in expected:
            assert text_part in said, said
        assert_nothing_written(run_dir)


def test_data_error_is_reported_on_stderr(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [guanaco_row(1), {"text": "### Human: no answer"}])
    result = run_data(tmp_path / "run", f"data.path={path}", check=False)
    assert result.returncode != 0
    assert f"{path}:2:" in result.stderr


def test_undecodable_line_is_a_bad_row(tmp_path):
    path = tmp_path / "latin1.jsonl"
    latin1 = '{"text": "### Human: caf\xe9 ### Assistant: b"}\n'.encode("latin-1")
    path.write_bytes(GOOD.encode() + b"\n" + latin1)
    run_dir = tmp_path / "run"
    result = run_data(run_dir, f"data.path={path}", check=False)
    assert result.returncode != 0
    assert f"{path}:2:" in output_of(result, run_dir)
    assert_nothing_written(run_dir)
    run_data(tmp_path / "skip", f"data.path={path}", "data.on_bad_row=skip")
    assert manifest(tmp_path / "skip")["stages"]["data"]["metrics"]["rows_skipped"] == 1


# ---------------------------------------------------------------- synthetic data


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("synthetic")
    for name in ("a", "b"):
        run_data(base / name, "experiment=tiny")
    return base / "a", base / "b"


def test_synthetic_eval_rows_carry_checkable_answers(synthetic_runs):
    run_dir = synthetic_runs[0]
    evals = read_jsonl(run_dir / "data" / "eval.jsonl")
    train = read_jsonl(run_dir / "data" / "train.jsonl")
    assert (len(train), len(evals)) == (600, 48)  # conf/data/synthetic.yaml
    for row in evals:
        assert isinstance(row["expected"], str) and row["expected"]
        assert row["messages"][-1]["role"] == "assistant"
        assert row["expected"] in row["messages"][-1]["content"]
    for row in train + evals:
        assert_alternating(row["messages"])
        check_dialog(row["messages"])


def test_synthetic_has_system_prompts_and_multi_turn(synthetic_runs):
    rows = read_jsonl(synthetic_runs[0] / "data" / "train.jsonl")
    systems = [r["messages"][0]["content"] for r in rows if r["messages"][0]["role"] == "system"]
    assert systems and "" in systems and any(systems)  # an empty system prompt is a case to learn too
    assert any(sum(m["role"] == "user" for m in r["messages"]) >= 2 for r in rows)
    assert any(r["messages"][0]["role"] == "user" for r in rows)


def test_synthetic_eval_conversations_are_held_out(synthetic_runs):
    run_dir = synthetic_runs[0]
    train = {key(r["messages"]) for r in read_jsonl(run_dir / "data" / "train.jsonl")}
    evals = [key(r["messages"]) for r in read_jsonl(run_dir / "data" / "eval.jsonl")]
    assert not train & set(evals)


def test_synthetic_generation_is_deterministic(synthetic_runs, tmp_path):
    a, b = synthetic_runs
    for name in ("train.jsonl", "eval.jsonl"):
        assert (a / "data" / name).read_bytes() == (b / "data" / name).read_bytes()
    run_data(tmp_path, "experiment=tiny", "data.seed=1")
    assert (tmp_path / "data" / "eval.jsonl").read_bytes() != (a / "data" / "eval.jsonl").read_bytes()


# ---------------------------------------------------------------- manifest and stage skipping


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_records_data_artifacts(split_run, local_jsonl):
    m = manifest(split_run)
    for rel in ("data/train.jsonl", "data/eval.jsonl"):
        path = split_run / rel
        assert m["artifacts"][rel] == {"sha256": sha256(path), "size": path.stat().st_size, "stage": "data"}
    stage = m["stages"]["data"]
    assert stage["outputs"] == ["data/eval.jsonl", "data/train.jsonl"]
    assert stage["inputs"] == {str(local_jsonl.resolve()): sha256(local_jsonl)}
    assert m["versions"]["python"]
    assert m["versions"]["hydra-core"] == metadata.version("hydra-core")
    assert m["versions"]["transformers"] == metadata.version("transformers")
    config = m["config"]
    assert "${" not in json.dumps(config)  # resolved, not interpolations
    assert config["run_dir"] == str(split_run)
    assert config["stage"] == "data"
    assert config["data"]["path"] == str(local_jsonl) and config["data"]["eval_fraction"] == 0.2
    assert config["train"]["lora"]["r"] == 64  # the whole config, not just the data group


def stage_skipped(result) -> bool:
    # the stage's own skip line, not the `rows_skipped` metric in the data log line
    return re.search(r"stage data: [^\n]*skipped", result.stdout + result.stderr) is not None


def test_unchanged_stage_is_skipped_and_force_reruns(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [guanaco_row(i) for i in range(N_ROWS)])
    run_dir = tmp_path / "run"
    run_data(run_dir, f"data.path={path}")
    data_dir = run_dir / "data"
    first = (data_dir.stat().st_ino, manifest(run_dir))

    result = run_data(run_dir, f"data.path={path}")
    said = result.stdout + result.stderr
    assert stage_skipped(result) and "stage data: running" not in said, said
    assert (data_dir.stat().st_ino, manifest(run_dir)) == first  # atomic_dir would have made a new dir

    result = run_data(run_dir, f"data.path={path}", "force=true")
    said = result.stdout + result.stderr
    assert "stage data: running" in said and not stage_skipped(result), said
    assert data_dir.stat().st_ino != first[0]

    # a changed input file is not skipped either
    write_jsonl(path, [guanaco_row(i) for i in range(N_ROWS + 5)])
    result = run_data(run_dir, f"data.path={path}")
    assert not stage_skipped(result)
    assert manifest(run_dir)["stages"]["data"]["metrics"]["rows_read"] == N_ROWS + 5

    # and neither is a changed data config
    result = run_data(run_dir, f"data.path={path}", "data.seed=3")
    assert not stage_skipped(result)
    assert manifest(run_dir)["config"]["data"]["seed"] == 3


# ---------------------------------------------------------------- atomic_dir


class Boom(Exception):
    pass


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(Boom):
        with atomic_dir(final) as tmp:
            (tmp / "half.txt").write_text("half")
            assert tmp.parent == final.parent and tmp.exists()
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_failure_keeps_existing_final(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("old")
    for error in (Boom, KeyboardInterrupt):  # an interrupt must clean up too
        with pytest.raises(error):
            with atomic_dir(final) as tmp:
                (tmp / "keep.txt").write_text("new")
                (tmp / "extra.txt").write_text("new")
                raise error
        assert sorted(p.name for p in final.iterdir()) == ["keep.txt"]
        assert (final / "keep.txt").read_text() == "old"
        assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_success_replaces_final(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "stale.txt").write_text("old")
    (tmp_path / ".out.tmp-999999").mkdir()  # left by a killed run
    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (final / "new.txt").exists()  # nothing under the final name until the block ends
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
