"""Safetensors shards written one at a time: the merge's output, and a large random base built
tensor by tensor (model=llama2_7b_shape), never whole in memory."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_bytes`, plus the index."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.tensor_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.tensor_bytes += size

    def flush(self) -> None:
        path = self.out_dir / f"shard-{len(self.shards)}.tmp"
        try:
            save_file(self.pending, path, metadata={"format": "pt"})
        except Exception as err:  # safetensors' Rust writer reports a full disk as SafetensorError
            if "No space left on device" in str(err) or "StorageFull" in str(err):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
            raise
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self.pending or not self.shards:
            self.flush()
        n = len(self.shards)
        names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        for i, name in enumerate(names):
            (self.out_dir / f"shard-{i}.tmp").rename(self.out_dir / name)
            (self.out_dir / name).chmod(0o644)  # safetensors writes 0600; servers run as other users
        if n > 1:
            weight_map = {t: names[i] for i, tensors in enumerate(self.shards) for t in tensors}
            index = {"metadata": {"total_size": self.tensor_bytes}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [self.out_dir / name for name in names]
