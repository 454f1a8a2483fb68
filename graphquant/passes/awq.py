"""``awq``: activation-aware weight quantization (Lin et al., 2023) at the sites the graph found.

At a smoothing site — norm→Linears, v_proj→o_proj, linear→linear (the same ``norm_linear``,
``attention_vo`` and ``linear_linear`` patterns SmoothQuant uses) — the input channels of the
site's Linears can be scaled by ``s`` while the producer (norm weight, v_proj rows, producer
rows) is divided by ``s``: ``y = (X / s)(W · diag s)ᵀ`` is the float function unchanged. For
weight-only quantization the output error becomes

    L(s) = Σ_Linears ‖ (X / s) (W·diag s − Q(W·diag s))ᵀ ‖²  =  Σ tr(E M Eᵀ) · n,
    E = (W·diag s − Q(W·diag s)) · diag(1/s),    M = XᵀX / n,

exact over every calibration token from the second-moment matrix ``M`` of the site input (no
activations are stored). AWQ searches ``s = mean|X|^α`` (normalised to geometric mean 1) over
``α ∈ {0, 1/grid, …, (grid−1)/grid}``; ``α = 0`` is ``s = 1`` (plain rounding), so the chosen
loss is never above the round-to-nearest loss. The scales are folded with SmoothQuant's
``apply_scales`` (producer ÷ s, Linear columns × s).

**Clipping.** Then, for every quantized Linear, the range of each weight group (row of a
per-channel spec) is shrunk to ``r·[min, max]`` with ``r`` from a 20-point grid in
``[0.5, 1]``, chosen per group to minimise that group's share of the output error
``dᵀ M_gg d`` (AWQ's clip search; ``r = 1`` is a candidate). The weights are clamped to the
chosen range, so ``insert_qdq``'s min/max round-to-nearest finds exactly that range again. The
clip is kept only when it lowers the Linear's full output error (cross-group terms included).

Calibration runs layer by layer (``LayerwiseRunner``); within a layer the statistics are taken
once (the site inputs are float and no site changes another site's input), and the next layer
sees this layer's scaled and clipped float weights. Sites are skipped (noted in the log) when
blocked for smoothing in the report, at lm_head, when R4 rotated the Linear's input, when no
consumer is quantized, or when the site reaches across layers.

Supported: static integer weights (int8/uint8/int4/uint4/int2), per_group or per_channel.
Activation quantizers, if the config has them, are not part of the loss (AWQ is a weight-only
method); this is noted once in the log.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ..config import QSchemeType, QuantizationSpec
from ..layerwise import LayerwiseRunner
from ..quant.fake_quant import quantize_weight
from . import weights as W
from .gptq import algo_config, quantization_targets
from .manager import PassContext, register_pass
from .smooth import apply_scales, expand_for_gqa, group_for_gqa, site_consumers, site_key

__all__ = ["awq_scales_search", "clip_search", "awq_loss"]

CLIP_GRID = 20
CLIP_MIN_RATIO = 0.5
SCALE_FLOOR = 1e-4  # mean|X| below this fraction of the largest channel's is raised to it


class _InputStats:
    """Σ|x| per channel and XᵀX (float64) of a Linear input over every calibration token."""

    def __init__(self):
        self.abs_sum = None
        self.gram = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if self.gram is None:
            self.abs_sum = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            self.gram = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
        self.abs_sum += x.abs().sum(dim=0)
        self.gram.addmm_(x.T, x)
        self.n += x.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)

    @property
    def second_moment(self) -> torch.Tensor:
        return self.gram / max(self.n, 1)


def _qdq(w: torch.Tensor, spec: QuantizationSpec) -> torch.Tensor:
    return quantize_weight(w.to(torch.float32), spec).dequantize(torch.float32)


def awq_loss(weights: list[tuple[torch.Tensor, QuantizationSpec | None]], M: torch.Tensor,
             s: torch.Tensor) -> float:
    """Mean squared output error per token, ``Σ tr(E M Eᵀ)``, of the Linears ``weights``
    ((W, spec) pairs; spec None: kept in float) whose input channels are scaled by ``s``."""
    M32 = M.to(torch.float32)
    s32 = s.to(torch.float32)
    total = 0.0
    for w, spec in weights:
        if spec is None:
            continue
        ws = w.to(torch.float32) * s32[None, :]
        E = (ws - _qdq(ws, spec)) / s32[None, :]
        total += float(((E @ M32) * E).sum())
    return total


def awq_scales_search(weights, M: torch.Tensor, x_mean_abs: torch.Tensor, grid: int, expand=None):
    """Grid search of AWQ's ``s = mean|X|^α``. ``x_mean_abs``: per scale channel (for v→o, per v
    channel; ``expand`` maps a scale to the Linears' input channels). Returns
    ``(s, alpha, loss, loss_at_alpha_0, losses)``."""
    x = x_mean_abs.to(torch.float64)
    x = x.clamp(min=float(x.max()) * SCALE_FLOOR if float(x.max()) > 0 else 1.0)
    expand = expand or (lambda v: v)
    losses = {}
    best = None
    for i in range(grid):
        alpha = i / grid
        s = x.pow(alpha)
        s = s / torch.exp(torch.log(s).mean())  # geometric mean 1
        loss = awq_loss(weights, M, expand(s))
        losses[alpha] = loss
        if best is None or loss < best[2]:
            best = (s, alpha, loss)
    return best[0], best[1], best[2], losses[0.0], losses


def _ranges(wg: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The min/max range of each group (widened to include 0), (rows, groups)."""
    lo = wg.amin(dim=-1).clamp(max=0.0)
    hi = wg.amax(dim=-1).clamp(min=0.0)
    if symmetric:
        amax = torch.maximum(-lo, hi)
        return -amax, amax
    return lo, hi


def clip_search(w: torch.Tensor, spec: QuantizationSpec, M: torch.Tensor, grid: int = CLIP_GRID,
                min_ratio: float = CLIP_MIN_RATIO) -> tuple[torch.Tensor, dict]:
    """AWQ's weight clipping: per group, the ratio ``r`` of its range minimising ``dᵀ M_gg d``
    (``d`` the group's quantization error, ``M_gg`` the group's block of the input second
    moment). Returns the clamped weight (or ``w`` itself when clipping does not lower the full
    output error) and a summary."""
    w = w.to(torch.float64)
    out, cin = w.shape
    gs = spec.group_size if spec.qscheme == QSchemeType.per_group else cin
    ng = -(-cin // gs)
    pad = ng * gs - cin  # a shorter last group: pad with zero columns (ranges include 0; M's zero rows
    # and columns give them no error)
    w_full = torch.nn.functional.pad(w, (0, pad)) if pad else w
    M_full = torch.nn.functional.pad(M, (0, pad, 0, pad)) if pad else M
    wg = w_full.reshape(out, ng, gs)
    M32 = M_full.to(torch.float32)
    blocks = torch.stack([M32[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(ng)])
    lo, hi = _ranges(wg, spec.symmetric)
    best_err = None
    best_r = torch.ones(out, ng, dtype=torch.float64, device=w.device)
    wg32 = wg.to(torch.float32)
    for i in range(grid):
        r = 1.0 - (1.0 - min_ratio) * i / grid
        clamped = torch.maximum(torch.minimum(wg, (r * hi)[..., None]), (r * lo)[..., None])
        d = wg32 - _qdq(clamped.reshape(out, ng * gs), spec).reshape(out, ng, gs)
        err = torch.einsum("ogi,gij,ogj->og", d, blocks, d)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    clipped = torch.maximum(torch.minimum(wg, (best_r * hi)[..., None]),
                            (best_r * lo)[..., None]).reshape(out, ng * gs)[:, :cin]
    before = awq_loss([(w, spec)], M, torch.ones(cin, dtype=torch.float64, device=w.device))
    after = awq_loss([(clipped, spec)], M, torch.ones(cin, dtype=torch.float64, device=w.device))
    info = {"loss_before": before, "loss_after": min(before, after), "mean_ratio": float(best_r.mean()),
            "clipped_groups": int((best_r < 1).sum()), "groups": int(best_r.numel()), "kept": after < before}
    return (clipped if after < before else w), info


def _awq_sites(ctx: PassContext, cfg, quantized: set[str]) -> list:
    """The smoothing sites AWQ may scale, chosen like SmoothQuant's (fc→fc included)."""
    from ..plan import Plan, _plan_smooth

    tmp = Plan()
    _plan_smooth(tmp, ctx.report, SimpleNamespace(fc_fc=True, scaling_layers=cfg.scaling_layers), auto=False,
                 exclude=list(getattr(ctx.config, "exclude", None) or []))
    for note in tmp.notes:
        ctx.record(action="skip_site", reason=note)
    r4 = {id(p) for p in (ctx.plan.r4.sites if ctx.plan is not None and ctx.plan.r4 is not None else [])}
    sites = []
    for p in tmp.smooth.sites:
        consumers = site_consumers(p)
        if id(p) in r4:
            ctx.record(action="skip_site", site=site_key(p), reason="R4 rotates the consumer's input online")
            continue
        if not any(c.fqn in quantized for c in consumers):
            ctx.record(action="skip_site", site=site_key(p), reason="no consumer has a weight quantizer")
            continue
        sites.append(p)
    return sites


def _modified_nodes(p) -> list:
    """Graph nodes whose outputs a site's scaling changes (they must be recomputed in-block)."""
    if p.kind == "norm_linear":
        return [p.nodes["norm"].output]
    if p.kind == "linear_linear":
        return [p.nodes["smooth_producer"].node]
    return [p.nodes["v_proj"].node]


@register_pass("awq", stage="algorithms", _builtin=True)
def awq(ctx: PassContext) -> None:
    from ..config import AWQConfig

    cfg = algo_config(ctx, "awq", AWQConfig)
    targets = quantization_targets(ctx, "AWQ", qschemes=("per_channel", "per_group"))
    if not targets:
        ctx.record(action="skip", reason="no Linear has an integer weight spec to quantize")
        return
    for name in ("model_decoder_layers", "embedding_layers"):
        if getattr(cfg, name, None):
            ctx.record(action="note", reason=f"AWQConfig.{name} is not needed: layers and sites come from the "
                                             "graph; ignored")
    spec_of = {lin.fqn: spec for lin, spec in targets}
    if any((qc := ctx.config.resolve(lin.fqn, "Linear")) is not None and qc.input_tensors is not None
           for lin, _ in targets):
        ctx.record(action="note", reason="activation quantizers are not part of AWQ's loss (weight-only method)")
    sites = _awq_sites(ctx, cfg, set(spec_of))
    together = [site_consumers(p) + ([p.nodes["smooth_producer"]] if p.kind == "linear_linear" else
                                     [p.nodes["v_proj"]] if p.kind == "attention_vo" else []) for p in sites]
    runner = LayerwiseRunner(ctx.captured, ctx.calib_data, [lin for lin, _ in targets],
                             progress=ctx.stats.get("progress", True), desc="AWQ", together=together)
    for block in runner.iterate():
        fqns = {lin.fqn for lin in block.linears}
        inputs: dict = {}
        for lin in block.linears:
            inputs.setdefault(lin.node.args[0], []).append(lin)
        stats = {node: _InputStats() for node in inputs}
        keys = {f"x{i}": node for i, node in enumerate(inputs)}
        runner.run(block, keys, lambda k, x: stats[keys[k]].add(x))
        order = {n: i for i, n in enumerate(ctx.gm.graph.nodes)}
        start = order[block.start]
        input_scale: dict = {}
        block_sites = [p for p in sites if any(c.fqn in fqns for c in site_consumers(p))]
        for p in block_sites:
            _scale_site(ctx, cfg, p, stats, spec_of, input_scale, order, start)
        for lin in block.linears:
            _clip_linear(ctx, lin, spec_of[lin.fqn], stats[lin.node.args[0]], input_scale.get(lin.node.args[0]))


def _scale_site(ctx, cfg, p, stats, spec_of, input_scale, order, start) -> None:
    key = site_key(p)
    consumers = site_consumers(p)
    nodes = {c.node.args[0] for c in consumers}
    if len(nodes) != 1:
        ctx.record(action="skip_site", site=key, reason="its Linears do not read one tensor")
        return
    x_node = next(iter(nodes))
    if x_node not in stats:
        ctx.record(action="skip_site", site=key, reason="its input is not read by a quantized Linear of this layer")
        return
    if any(order.get(n, -1) < start for n in _modified_nodes(p) + [c.node for c in consumers]):
        ctx.record(action="skip_site", site=key, reason="the scaled producer lies in an earlier layer")
        return
    st = stats[x_node]
    weights = [(W.read(ctx, c.weight), spec_of.get(c.fqn)) for c in consumers]
    if p.kind == "attention_vo":
        x_stat = group_for_gqa(p, st.mean_abs, reduce=torch.mean)

        def expand(v):
            return expand_for_gqa(p, v)
    else:
        x_stat, expand = st.mean_abs, None
    s, alpha, loss, loss0, _ = awq_scales_search(weights, st.second_moment, x_stat, cfg.grid, expand)
    s_in = expand(s) if expand is not None else s
    if alpha > 0:
        apply_scales(ctx, p, s)
        input_scale[x_node] = s_in
    ctx.record(action="awq", site=p.kind, key=key, modules=p.modules, alpha=alpha, loss=loss, loss_alpha0=loss0,
               grid=cfg.grid, scale_min=float(s.min()), scale_max=float(s.max()))


def _clip_linear(ctx, lin, spec, st: _InputStats, s_in) -> None:
    M = st.second_moment
    if s_in is not None:
        M = M / (s_in[:, None] * s_in[None, :])
    target = W.own_weight(ctx, lin)
    w = W.read(ctx, target)
    clipped, info = clip_search(w, spec, M)
    if info["kept"]:
        W.write(ctx, target, clipped)
    ctx.record(action="awq_clip", module=lin.fqn, **info)
