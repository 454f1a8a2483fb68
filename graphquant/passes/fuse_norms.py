"""``fuse_norms``: fold norm scales into the Linears that read them, so the norms become pure
normalisations that commute with a rotation of the residual stream.

- RMSNorm ``n(x)·w``: W ← W·diag(w), w ← 1. Gemma's ``n(x)·(1+w)``: W ← W·diag(1+w), w ← 0.
- pre-LN LayerNorm ``(x-μ)/σ·w + b`` (OPT): the residual stream is made zero-mean by centering
  every embedding row and every writer's output (W ← (I - 11ᵀ/d)·W, b ← b - mean(b)); then μ = 0
  and the LayerNorm equals an RMSNorm. w is folded into the readers, b into their biases
  (c ← c + W·b), and the ``layer_norm`` node is replaced by ``rms_norm`` without weight.
Post-LN placements are refused by the planner (the report gives the reason).
"""
from __future__ import annotations

import torch

from ..errors import PassError
from ..patterns.matcher import aten
from . import weights as W
from .manager import PassContext, register_pass


def _fold_rms(ctx: PassContext, norm) -> None:
    if norm.weight is None:
        return
    w = W.read(ctx, norm.weight)
    scale = 1.0 + w if norm.kind == "rms_offset" else w
    for lin in norm.linears:
        W.scale_columns(ctx, lin, scale)
    W.write(ctx, norm.weight, torch.zeros_like(w) if norm.kind == "rms_offset" else torch.ones_like(w))
    ctx.record(action="fold_norm", norm=norm.fqn, kind=norm.kind, into=[lin.fqn for lin in norm.linears],
               shape=list(w.shape))


def _center_stream(ctx: PassContext, rs) -> None:
    for lin in rs.nodes["readers"]:
        W.own_weight(ctx, lin)  # an embedding tied to lm_head must not be centered for lm_head
    for e in rs.nodes["embeddings"]:
        target = str(e.args[0].target)
        emb = W.read(ctx, target)
        W.write(ctx, target, emb - emb.mean(dim=1, keepdim=True))
        ctx.record(action="center", module=ctx.captured.node_module(e), shape=list(emb.shape))
    for lin in rs.nodes["writers"]:
        t = W.own_weight(ctx, lin)
        w = W.read(ctx, t)
        W.write(ctx, t, w - w.mean(dim=0, keepdim=True))
        if lin.bias is not None:
            b = W.read(ctx, lin.bias)
            W.write(ctx, lin.bias, b - b.mean())
        ctx.record(action="center", module=lin.fqn, shape=list(w.shape))


def _layernorm_to_rmsnorm(ctx: PassContext, norm) -> None:
    w = W.read(ctx, norm.weight) if norm.weight else None
    b = W.read(ctx, norm.bias) if norm.bias else None
    for lin in norm.linears:
        t = W.own_weight(ctx, lin)
        wl = W.read(ctx, t)
        if b is not None:
            bt = W.ensure_bias(ctx, lin)
            W.write(ctx, bt, W.read(ctx, bt) + wl @ b)
        if w is not None:
            W.write(ctx, t, wl * w[None, :])
    node = norm.output
    if node.target != aten.layer_norm.default:
        raise PassError(f"cannot convert {node.target} at {norm.fqn} to RMSNorm")
    g = ctx.gm.graph
    with g.inserting_after(node):
        rms = g.call_function(aten.rms_norm.default, (node.args[0], node.args[1], None, norm.eps))
    rms.meta = dict(node.meta)
    node.replace_all_uses_with(rms)
    g.erase_node(node)
    norm.output = rms
    norm.internal = {rms}
    norm.kind, norm.weight, norm.bias = "rms", None, None
    ctx.record(action="layernorm_to_rmsnorm", norm=norm.fqn, into=[lin.fqn for lin in norm.linears],
               bias_folded=b is not None)


@register_pass("fuse_norms", stage="norms", _builtin=True, offline=True)
def fuse_norms(ctx: PassContext) -> None:
    sites = ctx.plan.fuse_norms
    if not sites:
        return
    norms = [p.nodes["norm"] for p in sites]
    if any(n.kind == "layer_norm" for n in norms):
        rs = ctx.report.residual_stream
        if rs is None or "R1" not in rs.applies:
            raise PassError("LayerNorm to RMSNorm conversion needs a rotatable residual stream")
        _center_stream(ctx, rs)
    for n in norms:
        if n.kind == "layer_norm":
            _layernorm_to_rmsnorm(ctx, n)
        else:
            _fold_rms(ctx, n)
