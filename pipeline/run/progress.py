"""Progress on long stages: tqdm bars on stderr, shown only when stderr is a terminal (tqdm's
`disable=None`), so logs, CI and pipes stay quiet."""

from __future__ import annotations

import sys


def progress(iterable=None, desc: str = "", total: int | None = None, unit: str = "it"):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, disable=None, leave=False)


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()
