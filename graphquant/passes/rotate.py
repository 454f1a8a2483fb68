"""Offline rotations: ``rotate_residual`` (R1) and ``rotate_attention_vo`` (R2).

R1 rotates the residual stream by an orthogonal Q (x → xQ): embeddings E ← EQ, writers
W ← QᵀW (b ← bQ), readers W ← WQ. Norm weights must be folded first (``fuse_norms``), since
RMSNorm(xQ) = RMSNorm(x)Q only for a weightless norm.

R2 rotates each attention head's value space by H (head_dim × head_dim): v_proj rows of each
KV head W_h ← HᵀW_h (bias too), o_proj columns of each query head W_o[:, h] ← W_o[:, h]·H. All
query heads that share a KV head see the same H, so GQA needs one H per head_dim.
"""
from __future__ import annotations

import torch

from ..errors import PassError
from . import weights as W
from .manager import PassContext, register_pass


def rotation(n: int, kind: str, seed: int, device=None) -> torch.Tensor:
    from ..hadamard import rotation_matrix

    return rotation_matrix(n, kind=kind, seed=seed, dtype=torch.float64, device=device)


def _device(ctx: PassContext):
    from ..calibrate import _device_of

    return _device_of(ctx.gm)


def _check_norms_folded(ctx: PassContext, rs) -> None:
    for norm in rs.nodes["norms"]:
        if norm.weight is None:
            continue
        w = W.read(ctx, norm.weight)
        target = torch.zeros_like(w) if norm.kind == "rms_offset" else torch.ones_like(w)
        if not torch.equal(w, target):
            raise PassError(f"R1 needs the norm weights folded first, but {norm.fqn} still has a scale; "
                            "run fuse_norms before rotate_residual")


@register_pass("rotate_residual", stage="rotate", _builtin=True, offline=True)
def rotate_residual(ctx: PassContext) -> None:
    rp = ctx.plan.r1
    if rp is None:
        return
    rs = rp.sites[0]
    _check_norms_folded(ctx, rs)
    n = rs.details["hidden_size"]
    q = rotation(n, rp.kind, rp.seed, _device(ctx))
    for lin in rs.nodes["readers"]:
        W.own_weight(ctx, lin)
    for e in rs.nodes["embeddings"]:
        target = str(e.args[0].target)
        W.write(ctx, target, W.read(ctx, target) @ q)
        ctx.record(action="rotate", role="embedding", module=ctx.captured.node_module(e), side="out", size=n)
    for lin in rs.nodes["writers"]:
        t = W.own_weight(ctx, lin)
        W.write(ctx, t, q.T @ W.read(ctx, t))
        if lin.bias is not None:
            W.write(ctx, lin.bias, W.read(ctx, lin.bias) @ q)
        ctx.record(action="rotate", role="writer", module=lin.fqn, side="out", size=n)
    for lin in rs.nodes["readers"]:
        W.write(ctx, lin.weight, W.read(ctx, lin.weight) @ q)
        ctx.record(action="rotate", role="reader", module=lin.fqn, side="in", size=n)
    ctx.stats["r1_matrix_kind"] = rp.kind


def _rows(lin, v_slice):
    return tuple(v_slice) if v_slice else (0, None)


@register_pass("rotate_attention_vo", stage="rotate", _builtin=True, offline=True)
def rotate_attention_vo(ctx: PassContext) -> None:
    rp = ctx.plan.r2
    if rp is None:
        return
    cache: dict[int, torch.Tensor] = {}
    for p in rp.sites:
        d = p.details
        hd, nh, nkv = d["head_dim"], d["num_heads"], d["num_kv_heads"]
        h = cache.setdefault(hd, rotation(hd, rp.kind, rp.seed, _device(ctx)))
        v, o = p.nodes["v_proj"], p.nodes["o_proj"]
        tv = W.own_weight(ctx, v)
        wv = W.read(ctx, tv)
        a, b = _rows(v, d["v_slice"])
        b = wv.shape[0] if b is None else b
        blk = wv[a:b].reshape(nkv, hd, -1)
        wv[a:b] = torch.einsum("dk,ndi->nki", h, blk).reshape(nkv * hd, -1)  # Hᵀ·W_h per head
        W.write(ctx, tv, wv)
        if v.bias is not None:
            bv = W.read(ctx, v.bias)
            bv[a:b] = (bv[a:b].reshape(nkv, hd) @ h).reshape(-1)
            W.write(ctx, v.bias, bv)
        to = W.own_weight(ctx, o)
        wo = W.read(ctx, to)
        wo = (wo.reshape(wo.shape[0], nh, hd) @ h).reshape(wo.shape[0], nh * hd)
        W.write(ctx, to, wo)
        ctx.record(action="rotate", role="value_heads", modules=[v.fqn, o.fqn], head_dim=hd, heads=nh, kv_heads=nkv)
