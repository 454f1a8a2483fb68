"""Sharded safetensors as Hugging Face writes them: ``model.safetensors`` when one shard is enough,
else ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}``).

Tensors that share memory (tied weights) are written once per name as separate copies, so
safetensors never sees shared storage; callers drop names a format leaves out (e.g. a tied
``lm_head.weight``) before.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"


def parse_size(size) -> int:
    """``"5GB"`` / ``"500MiB"`` / an int (bytes) -> bytes, as ``graphquant.memory.parse_size`` reads sizes."""
    from ..memory import parse_size as _parse

    return _parse(size, "max_shard_size")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def storable(tensors: dict[str, torch.Tensor], seen_storage: set) -> dict[str, torch.Tensor]:
    """``tensors`` as safetensors can write them: on the CPU, contiguous, no two sharing memory (a tensor
    whose storage was already written, e.g. a tied weight, is copied). ``seen_storage`` carries the
    storages written so far across shards."""
    out = {}
    for k, t in tensors.items():
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr in seen_storage or not t.is_contiguous():
            t = t.clone().contiguous()
        if ptr is not None:
            seen_storage.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def write_sharded(tensors: dict[str, torch.Tensor], folder, max_shard_size="5GB",
                  metadata: dict | None = None) -> list[str]:
    """Write ``tensors`` into ``folder``; returns the file names written."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards: list[dict] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        if shards[-1] and size + _nbytes(t) > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += _nbytes(t)
    folder = Path(folder)
    meta = {"format": "pt", **(metadata or {})}
    files = []
    seen_storage: set = set()
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(storable(shard, seen_storage), str(folder / fname), metadata=meta)
        files.append(fname)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
                 "weight_map": {k: files[i] for i, s in enumerate(shards) for k in s}}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append(INDEX)
    return files


def read_sharded(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a (sharded) safetensors checkpoint folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or {INDEX} in {folder}")
    out = {}
    for f in files:
        out.update(load_file(str(folder / f)))
    return out
