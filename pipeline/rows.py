"""Row files: reading jsonl, json and parquet rows with each row's location (file and line, or row
index), and writing jsonl atomically. The data stage reads user files through here, and every later
stage reads the run's own `data/*.jsonl` through here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import DataError
from pipeline.io import atomic_file


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
                    row = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    yield f"{path}:{number}", err  # reported (or skipped) like any bad row
                    continue
                yield f"{path}:{number}", row
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: malformed JSON: {err.msg}") from err
        except UnicodeDecodeError as err:
            line = path.read_bytes()[: err.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not UTF-8 ({err.reason} at byte {err.start})") from err
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON array of rows")
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
