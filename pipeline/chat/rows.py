"""Row files: reading jsonl, json and parquet rows with each row's location (file and line, or row
index), and writing jsonl atomically. The data stage reads user files through here, and every later
stage reads the run's own `data/*.jsonl` through here."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from pipeline.run.errors import DataError
from pipeline.run.io import atomic_file

JSON_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|[\[\]{}]')  # strings (skipped whole) and brackets
DEEP = 500  # nesting depth reported as "too deep": Python's decoder gives up near its recursion limit


def deep_line(text: str) -> int:
    """The line where `text` first nests DEEP levels; the decoder's RecursionError does not say."""
    depth = 0
    for token in JSON_TOKEN.finditer(text):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(token.group(), 0)
        if depth >= DEEP:
            return text.count("\n", 0, token.start()) + 1
    return 1


def parse_json(text: str):
    """json.loads, with nesting past the interpreter's recursion limit as a JSONDecodeError: Python's
    decoder recurses once per `[` or `{`, so `[[[[...` 100,000 deep raises RecursionError otherwise."""
    try:
        return json.loads(text)
    except RecursionError:
        message = f"nested too deeply (arrays or objects over {DEEP} levels inside each other)"
        raise json.JSONDecodeError(message, text, 0) from None


def read_json_array(path: Path) -> list:
    """The rows of a .json file, read once: the bytes are dropped once decoded, the text once parsed."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({err.reason} at byte {err.start})") from err
    del data
    try:
        rows = parse_json(text)
    except json.JSONDecodeError as err:
        line = deep_line(text) if err.msg.startswith("nested too deeply") else err.lineno
        raise DataError(f"{path}:{line}: malformed JSON: {err.msg}") from err
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of rows")
    return rows


def read_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(location, row) pairs of a local jsonl/json/parquet file; location names file and line."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    row = parse_json(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    yield f"{path}:{number}", err  # reported (or skipped) like any bad row
                    continue
                yield f"{path}:{number}", row
    elif suffix == ".json":
        rows = read_json_array(path)
        for index, row in enumerate(rows):
            yield f"{path} row {index}", row
    elif suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except pyarrow.ArrowInvalid as err:
            raise DataError(f"{path}: not a parquet file ({err})") from err
        for index, row in enumerate(table.to_pylist()):
            yield f"{path} row {index}", row
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}: expected .jsonl, .json or .parquet")


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a jsonl file the pipeline wrote; a damaged line is named by file and line number."""
    rows = []
    for location, row in read_rows(path):
        if isinstance(row, Exception):
            raise DataError(f"{location}: not a JSON row ({row}); rerun the stage that wrote it")
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows) -> None:
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
