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


# the non-padding tokens of the calibration batch being run: (batch, seq) bool, or None (all tokens)
_TOKEN_MASK: list = [None]


def valid_tokens(x: torch.Tensor) -> torch.Tensor:
    """``x`` restricted to the real (non-padding) tokens of the current calibration batch.

    Activations laid out (batch, seq, ...) or, in attention, (batch, heads, seq, head_dim) become
    (tokens, ...) / (tokens, heads, head_dim); the channel (last) axis is kept. Without a padding
    mask, or for a tensor of another layout, ``x`` is returned as is."""
    m = _TOKEN_MASK[0]
    if m is None or x.dim() < 3 or x.shape[0] != m.shape[0]:
        return x
    s = m.shape[1]
    if x.dim() == 4 and x.shape[2] == s:
        return x.transpose(1, 2)[m]
    if x.shape[1] == s:
        return x[m]
    return x


def _token_mask(kw: dict) -> torch.Tensor | None:
    mask, ids = kw.get("attention_mask"), kw.get("input_ids")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    if isinstance(ids, torch.Tensor) and tuple(ids.shape) != tuple(mask.shape):
        raise CalibrationError(f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}; "
                               "they must match (batch, seq_len)")
    m = mask != 0
    return None if bool(m.all()) else m


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
        raise CalibrationError(f"input_ids must be token ids in an int64 tensor, got {ids.dtype}; convert with "
                               "ids.long() (token ids do not fit int8/uint8 and are not floats)")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise CalibrationError(f"input_ids out of range [0, {vocab}): min {int(ids.min())}, max {int(ids.max())}")
    if ids.dim() != 2:
        raise CalibrationError(f"input_ids must have shape (batch, seq_len), got {tuple(ids.shape)}")
    ctx_len = getattr(cfg, "max_position_embeddings", None)
    if isinstance(ctx_len, int) and ids.shape[1] > ctx_len and not getattr(captured, "_warned_context", False):
        import warnings

        captured._warned_context = True
        warnings.warn(f"graphquant: calibration batches of {ids.shape[1]} tokens are longer than the model's context "
                      f"({ctx_len} positions): activations at positions it was never trained on enter the statistics; "
                      f"use sequences of at most {ctx_len} tokens", UserWarning, stacklevel=3)


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
    total = len(calib_data) if hasattr(calib_data, "__len__") else None
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    bar = progress_bar(desc, progress, total=total)
    try:
        with torch.no_grad():
            for batch in it:
                args, kw = normalize_batch(batch, captured)
                _check_ids(kw, captured)
                _TOKEN_MASK[0] = _token_mask(kw)
                captured(*args, **kw)
                n += 1
                bar.update(1)
                if max_batches is not None and n >= max_batches:
                    break
    finally:
        _TOKEN_MASK[0] = None
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
        x = valid_tokens(x.detach())
        if not x.numel():
            return
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
