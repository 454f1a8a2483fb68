"""Accuracy metrics: perplexity, and the fidelity of a (quantized) model to its float reference.

``perplexity`` implements the standard protocols:

- **non-overlapping windows** (``stride=None``, the WikiText-2 / gq-llama-20m protocol): the stream is cut
  into ``seqlen`` windows from offset 0 (tail dropped); each window's loss is the mean next-token
  cross-entropy over its ``seqlen - 1`` predictions, exactly HF's ``model(ids, labels=ids).loss``; the
  perplexity is ``exp(mean window loss)``.
- **sliding window** (``stride < seqlen``, HF's "perplexity of fixed-length models" recipe): windows of up to
  ``seqlen`` tokens start every ``stride`` tokens; each scores only the tokens not scored before (the
  first window all its ``seqlen - 1`` predictions), the last window runs to the end of the stream, so every
  token but the first is scored exactly once, with at least ``seqlen - stride`` tokens of context after
  the first window. The loss is the mean over all scored tokens.

The model may be a Hugging Face model (output with ``.logits``), or any callable taking ``input_ids``
(``(batch, seq)`` LongTensor) and returning logits, an object with ``.logits``, a mapping with
``"logits"``, or a tuple whose first element is the logits. Cross-entropy is computed in float32.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from .errors import ConfigError

__all__ = ["PerplexityResult", "perplexity", "EmbeddingFidelity", "embedding_fidelity", "LogitsFidelity",
           "logits_fidelity"]


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(mean_loss)``; ``num_tokens`` is the number of scored predictions."""

    ppl: float
    mean_loss: float
    num_windows: int
    num_tokens: int

    def __str__(self) -> str:
        return (f"ppl {self.ppl:.4f} (loss {self.mean_loss:.5f} over {self.num_windows} windows, "
                f"{self.num_tokens} tokens)")


def _model_device(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return torch.device("cpu")


def _is_hf_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def _call(model, batch: torch.Tensor | Mapping[str, torch.Tensor]):
    """Run ``model`` on input ids or a dict of inputs (HF models get ``use_cache=False``)."""
    extra = {"use_cache": False} if _is_hf_model(model) and hasattr(model.config, "use_cache") else {}
    if isinstance(batch, Mapping):
        return model(**batch, **extra)
    if extra:
        return model(input_ids=batch, **extra)
    return model(batch)


def _first_tensor(out: Any, attr: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    val = getattr(out, attr, None)
    if isinstance(val, torch.Tensor):
        return val
    if isinstance(out, Mapping) and isinstance(out.get(attr), torch.Tensor):
        return out[attr]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find {attr} in the model output of type {type(out).__name__}: return a tensor, an "
                    f"object with .{attr}, a mapping with {attr!r} or a tuple whose first element is it")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    logits = _first_tensor(_call(model, ids), "logits")
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise TypeError(f"expected logits of shape (batch, seq, vocab) = ({ids.shape[0]}, {ids.shape[1]}, V), got "
                        f"{tuple(logits.shape)}")
    return logits


def _token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-prediction negative log-likelihood ``(batch, seq - 1)`` in float32."""
    logits = _logits(model, ids)
    b, t, v = logits.shape
    # (N, V) layout: CPU log_softmax over the last, contiguous dim is the accurate path (the (B, V, T) layout
    # differs from HF's loss by ~1e-5)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1), reduction="none")
    return nll.reshape(b, t - 1)


def perplexity(model, token_ids, seqlen: int | None = None, stride: int | None = None, batch_size: int = 1,
               device: str | torch.device | None = None, progress: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` on ``token_ids`` (see the module docstring for the protocols).

    ``token_ids``: a 1-D token stream (then ``seqlen`` is required) or a 2-D ``(N, seqlen)`` tensor of
    windows, each scored on its own (``stride`` must then be None). ``batch_size`` windows run per forward
    pass (the result does not depend on it). ``device`` defaults to the model's.
    """
    ids = torch.as_tensor(token_ids)
    if ids.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"token_ids must be integer token ids, got dtype {ids.dtype}")
    ids = ids.long()
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if ids.dim() == 2:
        if stride is not None:
            raise ConfigError("stride applies to a 1-D token stream; token_ids is already cut into windows (2-D)")
        if seqlen is not None and seqlen != ids.shape[1]:
            raise ConfigError(f"seqlen={seqlen} but the windows are {ids.shape[1]} tokens long")
        windows = ids
    elif ids.dim() == 1:
        if seqlen is None:
            raise ConfigError("seqlen is required to cut a 1-D token stream into windows (e.g. seqlen=512), or "
                              "pass 2-D (N, seqlen) windows")
        if stride is not None and not 0 < stride <= seqlen:
            raise ConfigError(f"stride must be in 1..seqlen={seqlen}, got {stride}")
        if stride is not None and stride < seqlen:
            return _sliding_perplexity(model, ids, seqlen, stride, batch_size, device, progress)
        windows = ids[: (ids.numel() // seqlen) * seqlen].reshape(-1, seqlen)
    else:
        raise ConfigError(f"token_ids must be 1-D (a stream) or 2-D (windows), got shape {tuple(ids.shape)}")
    if windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ConfigError(f"nothing to score: {tuple(windows.shape)} windows (need at least one window of >= 2 "
                          f"tokens; the stream has {ids.numel()} tokens)")

    device = torch.device(device) if device is not None else _model_device(model)
    losses = []
    starts = range(0, windows.shape[0], batch_size)
    with torch.no_grad():
        for i in _maybe_progress(starts, progress, "perplexity"):
            batch = windows[i:i + batch_size].to(device)
            losses.append(_token_nll(model, batch).mean(dim=1).double().cpu())
    window_loss = torch.cat(losses)
    mean_loss = window_loss.mean().item()
    return _result(mean_loss, windows.shape[0], windows.shape[0] * (windows.shape[1] - 1))


def _sliding_perplexity(model, ids, seqlen, stride, batch_size, device, progress) -> PerplexityResult:
    n = ids.numel()
    if n < 2:
        raise ConfigError(f"nothing to score: the stream has {n} token(s)")
    # (begin, end, number of tokens at the end of the window that are scored here)
    spans, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + seqlen, n)
        spans.append((begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == n:
            break
    device = torch.device(device) if device is not None else _model_device(model)
    total, count = 0.0, 0
    full = [s for s in spans if s[1] - s[0] == seqlen]
    short = [s for s in spans if s[1] - s[0] != seqlen]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in short]
    with torch.no_grad():
        for group in _maybe_progress(groups, progress, "perplexity"):
            batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            nll = _token_nll(model, batch).double().cpu()
            for row, (_, _, scored) in zip(nll, group):
                total += row[-scored:].sum().item()
                count += scored
    return _result(total / count, len(spans), count)


def _result(mean_loss: float, num_windows: int, num_tokens: int) -> PerplexityResult:
    if not math.isfinite(mean_loss):
        warnings.warn("graphquant: the perplexity is not finite (the model produced non-finite logits)",
                      stacklevel=3)
    ppl = math.exp(mean_loss) if mean_loss < 700 else math.inf
    return PerplexityResult(ppl=ppl, mean_loss=mean_loss, num_windows=num_windows, num_tokens=num_tokens)


def _maybe_progress(it, progress: bool, desc: str):
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc)


# ------------------------------------------------------------------------------------------------ fidelity


@dataclass(frozen=True)
class EmbeddingFidelity:
    """Cosine similarity between the two models' mean-pooled embeddings, per sequence."""

    mean_cosine: float
    min_cosine: float
    num_sequences: int

    @property
    def cosine(self) -> float:
        """The headline figure: the mean cosine similarity over all sequences."""
        return self.mean_cosine

    def __float__(self) -> float:
        return self.mean_cosine


def _as_inputs(batch) -> tuple[Any, torch.Tensor | None]:
    if isinstance(batch, Mapping):
        return dict(batch), batch.get("attention_mask")
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise TypeError(f"batches must be tensors of input ids or dicts of model inputs, got {type(batch).__name__}")


def _to_device(inputs, device):
    if isinstance(inputs, dict):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return inputs.to(device)


def embedding_fidelity(model_a, model_b, batches: Iterable) -> EmbeddingFidelity:
    """Cosine similarity of the mean-pooled last hidden states of two encoders (sentence-embedding fidelity).

    ``batches``: dicts of model inputs (``input_ids``, ``attention_mask``, ...; e.g. from
    :func:`graphquant.datasets.sentence_batches`) or tensors of input ids. Mean pooling is over the attention
    mask (all positions when there is none), as sentence-transformers' all-MiniLM does. Outputs may have
    ``.last_hidden_state``, be a tensor, or a tuple whose first element is the hidden states.
    """
    cos = []
    dev_a, dev_b = _model_device(model_a), _model_device(model_b)
    with torch.no_grad():
        for batch in batches:
            inputs, mask = _as_inputs(batch)
            pooled = []
            for model, dev in ((model_a, dev_a), (model_b, dev_b)):
                h = _first_tensor(_call(model, _to_device(inputs, dev)), "last_hidden_state").float().cpu()
                m = torch.ones(h.shape[:2]) if mask is None else mask.to(h.device, torch.float32)
                pooled.append((h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1e-9))
            cos.append(F.cosine_similarity(pooled[0], pooled[1], dim=-1))
    if not cos:
        raise ConfigError("embedding_fidelity got no batches")
    c = torch.cat(cos)
    return EmbeddingFidelity(mean_cosine=c.mean().item(), min_cosine=c.min().item(), num_sequences=c.numel())


@dataclass(frozen=True)
class LogitsFidelity:
    """Per-token relative L2 error ``||a - b|| / ||a||`` of the logits (a = reference), and top-1 agreement."""

    max_rel_err: float
    mean_rel_err: float
    top1_agreement: float
    num_tokens: int


def logits_fidelity(model_a, model_b, batches: Iterable) -> LogitsFidelity:
    """How closely ``model_b``'s logits follow the reference ``model_a``'s on the same inputs.

    ``batches``: tensors of input ids ``(batch, seq)`` or dicts of model inputs; positions where an
    ``attention_mask`` is 0 are ignored.
    """
    errs, agree = [], []
    dev_a, dev_b = _model_device(model_a), _model_device(model_b)
    with torch.no_grad():
        for batch in batches:
            inputs, mask = _as_inputs(batch)
            la = _first_tensor(_call(model_a, _to_device(inputs, dev_a)), "logits").float().cpu()
            lb = _first_tensor(_call(model_b, _to_device(inputs, dev_b)), "logits").float().cpu()
            if la.shape != lb.shape:
                raise ConfigError(f"the models' logits differ in shape: {tuple(la.shape)} vs {tuple(lb.shape)}")
            keep = torch.ones(la.shape[:-1], dtype=torch.bool) if mask is None else mask.bool().cpu()
            la, lb = la[keep], lb[keep]
            errs.append((la - lb).norm(dim=-1) / la.norm(dim=-1).clamp_min(1e-30))
            agree.append(la.argmax(-1) == lb.argmax(-1))
    if not errs:
        raise ConfigError("logits_fidelity got no batches")
    e, a = torch.cat(errs), torch.cat(agree)
    return LogitsFidelity(max_rel_err=e.max().item(), mean_rel_err=e.mean().item(),
                          top1_agreement=a.float().mean().item(), num_tokens=e.numel())
