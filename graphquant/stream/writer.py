"""Sharded safetensors written while the tensors arrive (one unit at a time), with the file names and
index Hugging Face uses: ``model.safetensors`` when one shard is enough, else
``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}``). Shards are numbered when the
last one is written, so a shard is held in memory only until it reaches ``max_shard_size``."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..export.shards import INDEX, parse_size


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class StreamingShardWriter:
    def __init__(self, folder, max_shard_size="5GB"):
        self.folder = Path(folder)
        self.limit = parse_size(max_shard_size)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []  # names per written shard
        self.total = 0
        self.names: set[str] = set()

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in sorted(tensors):
            if name in self.names:
                raise RuntimeError(f"streamed export: tensor {name} written twice (internal error)")
            t = tensors[name].detach()
            if t.device.type == "meta":
                raise RuntimeError(f"streamed export: tensor {name} was never loaded (internal error)")
            t = t.to("cpu")
            if self.pending and self.pending_bytes + _nbytes(t) > self.limit:
                self.flush()
            self.names.add(name)
            self.pending[name] = t
            self.pending_bytes += _nbytes(t)
            self.total += _nbytes(t)

    def flush(self) -> None:
        """Write the pending tensors as the next shard (under a temporary name)."""
        from safetensors.torch import save_file

        from ..export.shards import storable

        if not self.pending:
            return
        out = storable(self.pending, set())
        save_file(out, str(self._tmp_name(len(self.files))), metadata={"format": "pt"})
        self.files.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def _tmp_name(self, i: int) -> Path:
        return self.folder / f"shard-{i:05d}.safetensors.partial"

    def close(self) -> list[str]:
        """Write the last shard, name every shard and write the index; returns the file names."""
        self.flush()
        n = len(self.files)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, fname in enumerate(names):
            os.replace(self._tmp_name(i), self.folder / fname)
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: names[i] for i, ks in enumerate(self.files) for k in ks}}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            names.append(INDEX)
        return names
