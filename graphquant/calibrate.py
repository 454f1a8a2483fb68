"""Running the captured graph over calibration data, with probes that observe tensors at nodes.

Probes are temporary ``call_function`` nodes inserted after the nodes of interest; they call a
Python recorder and are removed afterwards, so the graph runs at full speed (no interpreter).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch
from torch import fx

from .errors import CalibrationError

_RECORDERS: dict[int, Callable[[str, torch.Tensor], None]] = {}


def _probe(recorder_id: int, key: str, x: torch.Tensor) -> None:
    _RECORDERS[recorder_id](key, x)


_probe.__module__ = __name__


@contextlib.contextmanager
def probes(gm: fx.GraphModule, nodes: dict[str, fx.Node], recorder: Callable[[str, torch.Tensor], None]):
    """Call ``recorder(key, value)`` with the value of each node in ``nodes`` while inside the block."""
    rid = id(recorder)
    _RECORDERS[rid] = recorder
    inserted = []
    try:
        for key, node in nodes.items():
            with gm.graph.inserting_after(node):
                inserted.append(gm.graph.call_function(_probe, (rid, key, node)))
        gm.recompile()
        yield
    finally:
        for n in inserted:
            gm.graph.erase_node(n)
        gm.recompile()
        _RECORDERS.pop(rid, None)


def _device_of(gm) -> torch.device:
    for p in gm.parameters():
        if p.device.type != "meta":  # the streamed pipeline keeps layers not yet loaded on "meta"
            return p.device
    return torch.device("cpu")


def normalize_batch(batch: Any, captured) -> tuple[tuple, dict]:
    """A calibration batch as (args, kwargs) for the captured graph: a tensor goes to the single
    example input (e.g. ``input_ids``); a dict is used as keyword inputs."""
    device = _device_of(captured.gm)
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 1:
            batch = batch[None]
        if captured.example_args:
            return (batch.to(device),), {}
        keys = list(captured.example_kwargs)
        if len(keys) != 1:
            raise CalibrationError(f"a calibration batch is a bare tensor but the model takes {keys}; pass dicts "
                                   "with those keys")
        return (), {keys[0]: batch.to(device)}
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        unknown = [k for k in batch if k not in captured.example_kwargs and k not in captured.constant_kwargs]
        if unknown:
            raise CalibrationError(f"calibration batch has keys {unknown} that the captured model does not take "
                                   f"(it takes {list(captured.example_kwargs)}); capture with example_inputs that "
                                   "include them or drop them")
        missing = [k for k in captured.example_kwargs if k not in batch]
        if missing:
            raise CalibrationError(f"calibration batch lacks {missing}; each batch needs the same keys as the "
                                   f"example inputs {list(captured.example_kwargs)}")
        kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        return (), kw
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(b, torch.Tensor) for b in batch):
        return normalize_batch(batch[0], captured) if len(batch) == 1 else \
            ((tuple(b.to(device) for b in batch)), {})
    raise CalibrationError(f"calibration batches must be tensors or dicts of tensors, got {type(batch).__name__}")


def _check_ids(kw: dict, captured) -> None:
    cfg = captured.config
    vocab = getattr(cfg, "vocab_size", None)
    ids = kw.get("input_ids")
    if ids is None or vocab is None:
        return
    if ids.dtype not in (torch.int64, torch.int32):
        raise CalibrationError(f"input_ids must be an integer tensor, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise CalibrationError(f"input_ids out of range [0, {vocab}): min {int(ids.min())}, max {int(ids.max())}")
    if ids.dim() != 2:
        raise CalibrationError(f"input_ids must have shape (batch, seq_len), got {tuple(ids.shape)}")


def run_batches(captured, calib_data: Iterable, desc: str = "calibrating", progress: bool = True,
                max_batches: int | None = None) -> int:
    """Run the graph over ``calib_data``; returns the number of batches. Empty data is an error."""
    if calib_data is None:
        raise CalibrationError(f"{desc} needs calibration data (an iterable of tensors or dicts of tensors)")
    if isinstance(calib_data, (torch.Tensor, dict)):
        calib_data = [calib_data]
    try:
        it = iter(calib_data)
    except TypeError:
        raise CalibrationError(f"calibration data must be iterable (a list or DataLoader of batches), got "
                               f"{type(calib_data).__name__}") from None
    n = 0
    bar = progress_bar(desc, progress)
    with torch.no_grad():
        for batch in it:
            args, kw = normalize_batch(batch, captured)
            _check_ids(kw, captured)
            captured(*args, **kw)
            n += 1
            bar.update(1)
            if max_batches is not None and n >= max_batches:
                break
    bar.close()
    if n == 0:
        raise CalibrationError("calibration data is empty: pass at least one batch (e.g. 16 windows of 512 tokens)")
    return n


def progress_bar(desc: str, enabled: bool, total: int | None = None, unit: str = "batch"):
    """A tqdm progress bar (or a silent stand-in when disabled or tqdm is missing)."""
    try:
        from tqdm.auto import tqdm

        return tqdm(desc=desc, total=total, unit=unit, disable=not enabled, leave=False)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()


class ChannelAbsMax:
    """Records max |x| per last-dim channel at each probe key; rejects non-finite values."""

    def __init__(self, where: dict[str, str] | None = None):
        self.values: dict[str, torch.Tensor] = {}
        self.where = where or {}

    def __call__(self, key: str, x: torch.Tensor) -> None:
        x = x.detach()
        if not torch.isfinite(x).all():
            raise CalibrationError(f"non-finite activations (NaN/Inf) at {self.where.get(key, key)} during "
                                   "calibration; check the calibration data and the model's dtype")
        m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        prev = self.values.get(key)
        self.values[key] = m if prev is None else torch.maximum(prev, m)


def collect_channel_absmax(captured, nodes: dict[str, fx.Node], calib_data, progress: bool = True,
                           desc: str = "collecting activation maxima") -> dict[str, torch.Tensor]:
    rec = ChannelAbsMax()
    with probes(captured.gm, nodes, rec):
        run_batches(captured, calib_data, desc=desc, progress=progress)
    return rec.values
