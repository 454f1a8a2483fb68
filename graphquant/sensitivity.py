"""Per-layer sensitivity of a quantized model, and excluding the layers that cost the most.

The reference PTQ advice "exclude outlier layers", done by the tool: for every quantized Linear of a
``QuantizedModel``, the loss on some token windows is measured with *only that Linear* back in float
(its weight read in float, its input not quantized) while everything else stays quantized. The loss
drop is that layer's contribution (leave-one-out). ``auto_exclude`` quantizes, ranks, and quantizes
again with the ``k`` costliest layers excluded.

Measure on calibration data, not on the evaluation text. The quantized model must keep its float
weights (``gq.quantize(..., keep_float_weights=True)``; ``auto_exclude`` does that).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import fx

from .errors import CalibrationError, ConfigError

__all__ = ["LayerSensitivity", "layer_sensitivity", "auto_exclude", "format_sensitivity"]


@dataclass(frozen=True)
class LayerSensitivity:
    """``loss_quantized - loss_with_this_layer_in_float``: how much this Linear adds to the mean token loss."""

    fqn: str
    delta_loss: float


def _tag():
    from .passes.quantize import QDQ_TAG

    return QDQ_TAG


def _layer_sites(qmodel) -> dict[str, tuple[fx.Node, fx.Node, str | None]]:
    """``fqn -> (linear node, weight dequantize node, float weight target)`` for every quantized weight."""
    tag = _tag()
    out = {}
    for n in qmodel.gm.graph.nodes:
        info = n.meta.get(tag)
        if not info or info.get("role") != "weight":
            continue
        for u in n.users:
            out[info["module"]] = (u, n, info.get("float_weight"))
    return out


@contextlib.contextmanager
def _in_float(qmodel, linear: fx.Node, dq: fx.Node, float_weight: str):
    """Run ``linear`` with its float weight and its unquantized input while inside the block."""
    tag = _tag()
    g = qmodel.gm.graph
    x = linear.args[0]
    info = x.meta.get(tag) if isinstance(x, fx.Node) else None
    with g.inserting_before(linear):
        w = g.get_attr(float_weight)
    linear.replace_input_with(dq, w)
    if info and info.get("role") == "input":
        linear.replace_input_with(x, x.args[0])
    qmodel.gm.recompile()
    try:
        yield
    finally:
        linear.replace_input_with(w, dq)
        if info and info.get("role") == "input":
            linear.replace_input_with(x.args[0], x)
        g.erase_node(w)
        qmodel.gm.recompile()


def _loss(model, windows: torch.Tensor, batch_size: int) -> float:
    from .eval import perplexity

    return perplexity(model, windows, batch_size=batch_size).mean_loss


def layer_sensitivity(qmodel, windows: torch.Tensor, batch_size: int = 8, layers=None,
                      progress: bool = False) -> list[LayerSensitivity]:
    """Leave-one-out loss contribution of every quantized Linear (or of ``layers``), largest first.

    ``windows``: token ids ``(n, seq_len)`` (e.g. a few calibration windows). Costs one evaluation of
    ``windows`` per layer.
    """
    from .calibrate import progress_bar

    sites = _layer_sites(qmodel)
    if not sites:
        raise ConfigError("layer_sensitivity: the model has no quantized weights")
    missing = [fqn for fqn, (_, _, fw) in sites.items() if fw is None]
    try:
        for fqn, (_, _, fw) in sites.items():
            qmodel.captured.param(fw)
    except AttributeError:
        raise CalibrationError("layer_sensitivity needs the float weights: quantize with "
                               "keep_float_weights=True") from None
    if missing:
        raise CalibrationError(f"layer_sensitivity: no float weight recorded for {missing[:3]}")
    names = list(sites) if layers is None else [f for f in layers if f in sites]
    base = _loss(qmodel, windows, batch_size)
    out = []
    bar = progress_bar("layer sensitivity", progress, total=len(names), unit="layer")
    for fqn in names:
        lin, dq, fw = sites[fqn]
        with _in_float(qmodel, lin, dq, fw):
            out.append(LayerSensitivity(fqn, base - _loss(qmodel, windows, batch_size)))
        bar.update(1)
    bar.close()
    return sorted(out, key=lambda s: -s.delta_loss)


def format_sensitivity(ranked: list[LayerSensitivity], top: int = 10) -> str:
    lines = [f"{'layer':48s} {'loss it adds':>12s}"]
    lines += [f"{s.fqn:48s} {s.delta_loss:12.5f}" for s in ranked[:top]]
    return "\n".join(lines)


def auto_exclude(model, config, calib_data, k: int, windows: torch.Tensor | None = None, batch_size: int = 8,
                 progress: bool = False, **quantize_kw):
    """Quantize ``model``, rank the quantized Linears by :func:`layer_sensitivity`, and quantize again with the
    ``k`` costliest ones added to ``config.exclude``. Returns ``(qmodel, ranked)``.

    ``windows``: token ids to measure on; default: the calibration batches (stacked).
    """
    from .api import _as_config, _materialize, quantize

    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ConfigError(f"auto_exclude: k must be an int >= 0, got {k!r}")
    config = _as_config(config)
    calib = _materialize(calib_data)
    if windows is None:
        ids = [b.get("input_ids") if isinstance(b, dict) else b for b in (calib or [])]
        if not ids or not all(isinstance(b, torch.Tensor) for b in ids):
            raise CalibrationError("auto_exclude: pass windows= (token ids) when the calibration batches are not "
                                   "token-id tensors or dicts with input_ids")
        windows = torch.cat([b if b.dim() == 2 else b[None] for b in ids])
    measure_kw = {k: v for k, v in quantize_kw.items() if k != "lower"}  # measured on the fake-quant graph
    first = quantize(model, config, calib, keep_float_weights=True, progress=progress, **measure_kw)
    ranked = layer_sensitivity(first, windows, batch_size=batch_size, progress=progress)
    if k == 0:
        return first, ranked
    excluded = [s.fqn for s in ranked[:k]]
    cfg = dataclasses.replace(config, exclude=list(config.exclude or []) + excluded)
    del first
    return quantize(model, cfg, calib, progress=progress, **quantize_kw), ranked
