"""Free disk space, checked before a large write: a stage that would fill the disk refuses before it
starts, naming what it needs and what is free, instead of failing half-way (ENOSPC)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from pipeline.run.errors import PipelineError

# Bits per weight of llama.cpp's types, a little above their nominal size (headers, the embedding
# and output tensors kept at higher precision), so the estimate errs on the side of refusing.
GGUF_BITS = {
    "F32": 32.0,
    "F16": 16.0,
    "BF16": 16.0,
    "Q8_0": 8.5,
    "Q6_K": 6.6,
    "Q5_K_M": 5.7,
    "Q5_K_S": 5.6,
    "Q4_K_M": 4.9,
    "Q4_K_S": 4.6,
    "Q4_0": 4.6,
    "IQ4_XS": 4.4,
    "Q3_K_M": 3.9,
    "Q3_K_S": 3.5,
    "Q2_K": 3.4,
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
SLACK_BYTES = 64 << 20  # tokenizer, configs, Modelfiles, logs, and filesystem overhead


class NoSpace(PipelineError, OSError):
    """Not enough free disk space for what a stage is about to write."""


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def safetensors_elements(files) -> int:
    """How many weights the safetensors files hold, read from their headers (no tensor is loaded)."""
    total = 0
    for path in files:
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def gguf_bytes(elements: int, type_name: str) -> int:
    return int(elements * GGUF_BITS.get(type_name, 16.0) / 8)


# The running stage's last checked write, (what, bytes with slack): a disk that fills up anyway
# (another writer took the space after the check) is reported with what the stage needed.
checked_write: tuple[str, int] | None = None


def require_free(directory: Path, needed: int, what: str) -> None:
    """Raise NoSpace unless `directory`'s file system has room for `needed` bytes (plus slack)."""
    global checked_write
    checked_write = (f"{what} in {directory}", needed + SLACK_BYTES)
    directory = Path(directory)
    existing = directory
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed + SLACK_BYTES:
        raise NoSpace(
            f"{directory}: not enough free disk space for {what}: needs about {human(needed + SLACK_BYTES)}, "
            f"{human(free)} free there"
        )
