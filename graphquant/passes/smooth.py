"""``smooth`` (SmoothQuant): move activation outliers into weights with per-channel scales
s = max|X|^α / max|W|^(1-α), folded into the op before the Linear (norm weight, producer Linear
rows, or v_proj rows) and multiplied into the Linear's input columns. Exactly function-preserving.
"""
from __future__ import annotations

import torch

from ..calibrate import collect_channel_absmax
from ..errors import CalibrationError
from . import weights as W
from .manager import PassContext, register_pass


def site_input(p):
    """The graph node whose value the smoothed Linears read (the activation that gets divided by s)."""
    if p.kind == "norm_linear":
        return p.nodes["norm"].output
    if p.kind == "linear_linear":
        return p.nodes["consumer"].node.args[0]
    if p.kind == "attention_vo":
        return p.nodes["o_proj"].node.args[0]
    raise ValueError(p.kind)


def site_consumers(p):
    if p.kind == "norm_linear":
        return p.nodes["norm"].linears
    if p.kind == "linear_linear":
        return [p.nodes["consumer"]]
    return [p.nodes["o_proj"]]


def site_key(p) -> str:
    return f"{p.kind}:{p.modules[0]}->{p.modules[-1]}"


def collect_site_absmax(ctx: PassContext, sites) -> dict[str, torch.Tensor]:
    """Per-channel max |X| at the inputs of the smoothing sites, from one calibration run."""
    if ctx.calib_data is None:
        raise CalibrationError("SmoothQuant needs calibration data to measure activation maxima: pass calib_data "
                               "(an iterable of input_ids tensors or dicts)")
    nodes = {site_key(p): site_input(p) for p in sites}
    return collect_channel_absmax(ctx.captured, nodes, ctx.calib_data, desc="smoothquant statistics",
                                  progress=ctx.stats.get("progress", True))


def weight_absmax(ctx, consumers) -> torch.Tensor:
    return torch.stack([W.read(ctx, lin.weight).abs().amax(dim=0) for lin in consumers]).amax(dim=0)


def smoothing_scales(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float, clamp_min: float) -> torch.Tensor:
    act_max = act_max.to(torch.float64).clamp(min=1e-12)
    w_max = w_max.to(torch.float64).clamp(min=1e-12)
    s = act_max.pow(alpha) / w_max.pow(1.0 - alpha)
    return s.clamp(min=clamp_min)


def group_for_gqa(p, per_o_channel: torch.Tensor, reduce=torch.amax) -> torch.Tensor:
    """Reduce o_proj-input statistics (heads*hd) to v channels (kv_heads*hd): heads sharing a KV
    head must share one scale."""
    d = p.details
    hd, nh, nkv = d["head_dim"], d["num_heads"], d["num_kv_heads"]
    g = nh // nkv
    x = per_o_channel.reshape(nkv, g, hd)
    return reduce(x, dim=1).reshape(nkv * hd)


def expand_for_gqa(p, per_v_channel: torch.Tensor) -> torch.Tensor:
    d = p.details
    hd, nh, nkv = d["head_dim"], d["num_heads"], d["num_kv_heads"]
    return per_v_channel.reshape(nkv, 1, hd).expand(nkv, nh // nkv, hd).reshape(nh * hd)


def apply_scales(ctx: PassContext, p, s: torch.Tensor) -> None:
    """Fold ``s`` (per input channel of the site's Linears; per v channel for attention_vo)."""
    if p.kind == "norm_linear":
        norm = p.nodes["norm"]
        w = W.read(ctx, norm.weight)
        if norm.kind == "rms_offset":
            W.write(ctx, norm.weight, (1.0 + w) / s - 1.0)
        else:
            W.write(ctx, norm.weight, w / s)
        if norm.bias is not None:
            W.write(ctx, norm.bias, W.read(ctx, norm.bias) / s)
        for lin in norm.linears:
            W.scale_columns(ctx, lin, s)
    elif p.kind == "linear_linear":
        prod = p.nodes["smooth_producer"]
        rows = p.details["smooth_slice"]
        W.scale_rows(ctx, prod, s, tuple(rows) if rows else None)
        W.scale_columns(ctx, p.nodes["consumer"], s)
    elif p.kind == "attention_vo":
        v = p.nodes["v_proj"]
        rows = p.details["v_slice"]
        W.scale_rows(ctx, v, s, tuple(rows) if rows else None)
        W.scale_columns(ctx, p.nodes["o_proj"], expand_for_gqa(p, s))


def site_scales(ctx, p, act_max: torch.Tensor, alpha: float, clamp_min: float) -> torch.Tensor:
    w_max = weight_absmax(ctx, site_consumers(p))
    if p.kind == "attention_vo":
        return smoothing_scales(group_for_gqa(p, act_max), group_for_gqa(p, w_max), alpha, clamp_min)
    return smoothing_scales(act_max, w_max, alpha, clamp_min)


@register_pass("smooth", stage="smooth", _builtin=True, offline=True)
def smooth(ctx: PassContext) -> None:
    sp = ctx.plan.smooth
    if sp is None or not sp.sites:
        return
    stats = collect_site_absmax(ctx, sp.sites)
    ctx.stats["smooth_act_absmax"] = stats
    if sp.auto:
        from .auto_smooth import choose_alphas

        alphas = choose_alphas(ctx, sp, stats)
    else:
        alphas = {site_key(p): sp.alpha for p in sp.sites}
    for p in sp.sites:
        key = site_key(p)
        s = site_scales(ctx, p, stats[key], alphas[key], sp.scale_clamp_min)
        apply_scales(ctx, p, s)
        ctx.record(action="smooth", site=p.kind, modules=p.modules, alpha=alphas[key], channels=int(s.numel()),
                   scale_min=float(s.min()), scale_max=float(s.max()))
