"""Online rotations (QuaRot R3, R4): Hadamard nodes inserted into the graph.

R4: before every Linear found by ``linear_linear`` (down_proj, fc2, BERT's FFN output dense) the
input becomes x·Hᵀ and the weight W·Hᵀ, so y = x·Hᵀ·(W·Hᵀ)ᵀ = x·Wᵀ. Activation outliers of the
intermediate space are spread over all channels before they are quantized.

R3: Q and K, as attention reads them (after RoPE and the GQA repeat), both become ·Hᵀ along
head_dim, so Q·Kᵀ is unchanged; the K written to the KV cache is rotated, which is what makes a
low-bit KV cache work. No weight changes.

Both use ``graphquant::hadamard_transform`` (O(n log n) on CPU, a Triton kernel on CUDA).
"""
from __future__ import annotations

import torch
from torch import fx

from . import weights as W
from .manager import PassContext, register_pass


def insert_hadamard(gm: fx.GraphModule, value: fx.Node, before: fx.Node, tag: str) -> fx.Node:
    """Insert ``hadamard_transform(value)`` right before ``before`` and route ``before`` to it."""
    from .. import hadamard  # noqa: F401  registers the op

    with gm.graph.inserting_before(before):
        h = gm.graph.call_function(torch.ops.graphquant.hadamard_transform.default, (value, False))
    if "val" in value.meta:
        h.meta["val"] = value.meta["val"]
    h.meta["graphquant"] = tag
    before.replace_input_with(value, h)
    return h


@register_pass("online_r4", stage="online_rotate", _builtin=True, offline=True)
def online_r4(ctx: PassContext) -> None:
    from ..hadamard import hadamard_transform

    rp = ctx.plan.r4
    if rp is None:
        return
    for p in rp.sites:
        lin = p.nodes["consumer"]
        t = W.own_weight(ctx, lin)
        w = W.read(ctx, t)
        W.write(ctx, t, hadamard_transform(w))  # W·Hᵀ
        insert_hadamard(ctx.gm, lin.node.args[0], lin.node, "R4")
        ctx.record(action="online_hadamard", site="R4", module=lin.fqn, size=int(w.shape[1]),
                   factorization=p.details["hadamard"]["factorization"])


@register_pass("online_r3", stage="online_rotate", _builtin=True, offline=True)
def online_r3(ctx: PassContext) -> None:
    rp = ctx.plan.r3
    if rp is None:
        return
    for p in rp.sites:
        site = p.nodes["site"]
        consumer = site.out if site.kind == "sdpa" else None
        for role in ("q", "k"):
            value = getattr(site, role)
            user = consumer if consumer is not None else _eager_user(site, role)
            h = insert_hadamard(ctx.gm, value, user, "R3")
            setattr(site, role, h)
            p.nodes[role] = h
        ctx.record(action="online_hadamard", site="R3", module=p.details["attention"], head_dim=p.details["head_dim"],
                   factorization=p.details["hadamard"]["factorization"])


def _eager_user(site, role: str) -> fx.Node:
    """In eager attention, the node that consumes q (the scores matmul) or k (its transpose)."""
    value = getattr(site, role)
    users = list(value.users)
    if len(users) != 1:
        raise RuntimeError(f"R3: {role} of {site.fqn} has {len(users)} users; expected one")
    return users[0]
