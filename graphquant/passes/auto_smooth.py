"""AutoSmoothQuant: SmoothQuant with α chosen per site by the quantized output error.

For each smoothing site (the plan's ``SmoothPlan.sites``) and each candidate α of
``AutoSmoothQuantConfig.alphas``, the SmoothQuant scales ``s(α) = max|X|^α / max|W|^(1−α)``
(``smooth.site_scales``, exactly what the ``smooth`` pass then folds) are applied to a sample
of the site's calibration inputs ``X`` and to its Linears, both are quantized with the config's
specs (``ctx.config.resolve(fqn, "Linear")``: ``input_tensors`` and ``weight``; int8 per-tensor
symmetric static for both when there is no config, e.g. in ``gq.rewrite``), and the loss is

    L(α) = Σ_Linears ‖ X Wᵀ − Q_a(X / s) · Q_w(W · diag s)ᵀ ‖² / (tokens · out_features)

(mean squared error of the site's Linear outputs against float). The α with the smallest loss
is chosen and logged per site (``action="autosmooth_alpha"``, with every α's loss).

Static activation quantizers get min/max qparams from the sample; for a per-tensor symmetric
spec the range is widened to ``max_c(max|X_c| / s_c)`` from the full-data statistics the smooth
pass measured, which is what a min/max observer over all calibration data would find. Dynamic
specs are applied as at run time (``dynamic_fake_quantize``).

Inputs are collected layer by layer (``LayerwiseRunner``) on at most ``MAX_BATCHES`` batches,
keeping ``MAX_TOKENS`` randomly chosen tokens per site (seeded), so memory stays at one
layer's samples. Nothing is changed until every α is chosen; when the smooth pass then folds
them, fc→fc chains (``fc_fc=True``) see the scales of the sites before them in the weights
they share, which the search (done on the unsmoothed weights) does not model.

``choose_alphas`` is called by the ``smooth`` pass when ``plan.smooth.auto`` is set
(``AutoSmoothQuantConfig`` given to ``rewrite`` / the plan). ``Config`` only accepts
``AutoSmoothQuantConfig`` in ``algo_config``; there, the ``autosmoothquant`` pass (registered
in the ``smooth`` stage, as an offline function-preserving rewrite checked by the equivalence
guard) builds the same SmoothPlan the planner would and runs the ``smooth`` pass: one
implementation, whichever way the config arrives.
"""
from __future__ import annotations

import math

import torch

from ..config import QuantizationConfig, QuantizationSpec
from ..errors import ConfigError
from ..layerwise import LayerwiseRunner
from ..quant.fake_quant import compute_qparams, dynamic_fake_quantize, fake_quantize, minmax, quantize_weight
from . import weights as W
from .gptq import algo_config
from .manager import PassContext, register_pass
from .smooth import expand_for_gqa, site_consumers, site_input, site_key, site_scales, smooth

__all__ = ["choose_alphas", "site_loss", "DEFAULT_QCONFIG"]

MAX_TOKENS = 2048  # sampled tokens per site
MAX_BATCHES = 32  # calibration batches used for the search

DEFAULT_QCONFIG = QuantizationConfig(
    input_tensors=QuantizationSpec(dtype="int8", qscheme="per_tensor", symmetric=True),
    weight=QuantizationSpec(dtype="int8", qscheme="per_tensor", symmetric=True))


class _TokenSample:
    """A seeded random subset of rows (tokens) of the tensors seen at one site."""

    def __init__(self, per_batch: int, seed: int):
        self.per_batch = per_batch
        self.gen = torch.Generator().manual_seed(seed)
        self.parts: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[0] > self.per_batch:
            idx = torch.randperm(x.shape[0], generator=self.gen)[:self.per_batch].to(x.device)
            x = x[idx]
        self.parts.append(x.to(torch.float32))

    def tensor(self) -> torch.Tensor:
        return torch.cat(self.parts)


def _quantize_input(xs: torch.Tensor, spec: QuantizationSpec | None, amax_full: float | None) -> torch.Tensor:
    if spec is None:
        return xs
    if spec.is_cast:
        return fake_quantize(xs, None, None, spec)
    if spec.is_dynamic:
        return dynamic_fake_quantize(xs, spec)
    lo, hi = minmax(xs, spec)
    if amax_full is not None and spec.qscheme.value == "per_tensor" and spec.symmetric:
        hi = torch.maximum(hi, torch.tensor(amax_full, dtype=hi.dtype, device=hi.device))
    scale, zp = compute_qparams(lo, hi, spec)
    return fake_quantize(xs, scale, zp, spec)


def _quantize_weight(w: torch.Tensor, spec: QuantizationSpec | None) -> torch.Tensor:
    if spec is None:
        return w
    if spec.is_cast:
        return fake_quantize(w, None, None, spec)
    return quantize_weight(w, spec).dequantize(torch.float32)


def site_loss(x: torch.Tensor, s_in: torch.Tensor, linears: list[tuple[torch.Tensor, QuantizationConfig | None]],
              references: list[torch.Tensor], act_absmax: torch.Tensor | None = None) -> float:
    """Mean squared error of the Linears' outputs when their input channels are smoothed by
    ``s_in`` and input and weight are quantized by each Linear's ``QuantizationConfig``
    (``None``: kept in float). ``references``: the float outputs ``x Wᵀ``."""
    s = s_in.to(torch.float32)
    xs = x / s[None, :]
    amax_full = float((act_absmax.to(torch.float32) / s).max()) if act_absmax is not None else None
    sse, count = 0.0, 0
    cache: dict[str, torch.Tensor] = {}
    for (w, qc), ref in zip(linears, references):
        count += ref.numel()
        if qc is None:
            continue
        a_spec = qc.input_tensors
        key = a_spec.to_op_str() if a_spec is not None else ""
        if key not in cache:
            cache[key] = _quantize_input(xs, a_spec, amax_full)
        wq = _quantize_weight(w.to(torch.float32) * s[None, :], qc.weight)
        sse += float(((cache[key] @ wq.T - ref) ** 2).sum())
    return sse / max(count, 1)


def choose_alphas(ctx: PassContext, smooth_plan, act_absmax_stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """{site_key: α}: per site, the α of ``smooth_plan.alphas`` with the smallest quantized
    output error of the site's Linears (see the module docstring); logged per site."""
    alphas = tuple(smooth_plan.alphas) or tuple(round(0.05 * i, 2) for i in range(21))
    sites = list(smooth_plan.sites)
    if not sites:
        return {}
    batches = list(ctx.calib_data)[:MAX_BATCHES] if ctx.calib_data is not None else None
    consumers = [lin for p in sites for lin in site_consumers(p)]
    runner = LayerwiseRunner(ctx.captured, batches, consumers, progress=ctx.stats.get("progress", True),
                             desc="AutoSmoothQuant")
    per_batch = max(1, math.ceil(MAX_TOKENS / max(len(runner.batches), 1)))
    chosen: dict[str, float] = {}
    for block in runner.iterate():
        in_block = {lin.fqn for lin in block.linears}
        bsites = [p for p in sites if site_key(p) not in chosen and any(c.fqn in in_block for c in site_consumers(p))]
        if not bsites:
            continue
        samples = {site_key(p): _TokenSample(per_batch, seed=i) for i, p in enumerate(bsites)}
        runner.run(block, {site_key(p): site_input(p) for p in bsites}, lambda k, x: samples[k].add(x))
        for p in bsites:
            key = site_key(p)
            chosen[key] = _choose(ctx, p, samples[key].tensor(), act_absmax_stats[key], alphas, smooth_plan)
    return chosen


def _qconfig(ctx: PassContext, fqn: str):
    if ctx.config is None:
        return DEFAULT_QCONFIG
    return ctx.config.resolve(fqn, "Linear")


def _choose(ctx: PassContext, p, x: torch.Tensor, act_max: torch.Tensor, alphas, sp) -> float:
    linears = [(W.read(ctx, lin.weight).to(torch.float32), _qconfig(ctx, lin.fqn)) for lin in site_consumers(p)]
    refs = [x @ w.T for w, _ in linears]
    losses = {}
    for a in alphas:
        s = site_scales(ctx, p, act_max, a, sp.scale_clamp_min)
        s_in = expand_for_gqa(p, s) if p.kind == "attention_vo" else s
        losses[a] = site_loss(x, s_in.to(x.device), linears, refs, act_max.to(x.device))
    best = min(alphas, key=lambda a: losses[a])  # first of equal losses
    ctx.record(action="autosmooth_alpha", site=p.kind, key=site_key(p), modules=p.modules, alpha=best,
               loss=losses[best], tokens=int(x.shape[0]), losses={str(a): v for a, v in losses.items()})
    return best


@register_pass("autosmoothquant", stage="smooth", _builtin=True, offline=True)
def autosmoothquant(ctx: PassContext) -> None:
    """``AutoSmoothQuantConfig`` in ``Config.algo_config``: plan the smoothing sites as the
    planner does for a pre-quantization config and run the ``smooth`` pass in auto mode."""
    from ..config import AutoSmoothQuantConfig
    from ..plan import Plan, _plan_smooth

    cfg = algo_config(ctx, "autosmoothquant", AutoSmoothQuantConfig)
    if ctx.plan.smooth is not None:
        raise ConfigError("AutoSmoothQuant was requested together with another smoothing config "
                          "(SmoothQuantConfig/AutoSmoothQuantConfig in pre_quant_opt_config); keep one of them")
    tmp = Plan()
    _plan_smooth(tmp, ctx.report, cfg, auto=True, exclude=list(getattr(ctx.config, "exclude", None) or []))
    ctx.plan.smooth = tmp.smooth
    ctx.plan.notes.extend(tmp.notes)
    smooth(ctx)
