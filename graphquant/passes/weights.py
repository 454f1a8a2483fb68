"""Reading and writing weights of the captured graph, exactly and safely.

Rewrites compute in float64 and cast back to the parameter's dtype. A weight shared by several
consumers (tied embeddings) is given its own copy before a pass changes it for one consumer.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from ..capture import set_attr
from ..patterns.base import LinearSite
from ..patterns.matcher import is_transparent, skip_transparent_back

COMPUTE = torch.float64


def read(ctx, target: str) -> torch.Tensor:
    return ctx.captured.param(target).detach().to(COMPUTE).clone()


def write(ctx, target: str, value: torch.Tensor) -> None:
    p = ctx.captured.param(target)
    if tuple(p.shape) != tuple(value.shape):
        raise ValueError(f"shape mismatch writing {target}: {tuple(p.shape)} vs {tuple(value.shape)}")
    with torch.no_grad():
        p.copy_(value.to(p.dtype))


def _get_attr_node(node: fx.Node) -> fx.Node:
    return skip_transparent_back(node)


def _consumers(attr: fx.Node) -> set:
    """Real consumers of a get_attr node, looking through casts."""
    out, stack = set(), [attr]
    while stack:
        n = stack.pop()
        for u in n.users:
            if is_transparent(u) and u.args[0] is n:
                stack.append(u)
            else:
                out.add(u)
    return out


def own_weight(ctx, lin: LinearSite) -> str:
    """Make sure ``lin``'s weight is not shared with another op; return its (possibly new) target."""
    attr = _get_attr_node(lin.node.args[1])
    if _consumers(attr) <= {lin.node}:
        return lin.weight
    gm = ctx.gm
    new_target = f"{lin.fqn}.weight"
    if new_target == lin.weight or _has_attr(gm, new_target):
        new_target = f"{lin.fqn}.weight_untied"
    old = ctx.captured.param(lin.weight)
    set_attr(gm, new_target, nn.Parameter(old.detach().clone(), requires_grad=False))
    with gm.graph.inserting_before(lin.node):
        new_attr = gm.graph.get_attr(new_target)
    new_attr.meta = dict(attr.meta)
    lin.node.replace_input_with(lin.node.args[1], new_attr)
    ctx.record(action="untie", module=lin.fqn, shared=lin.weight, new=new_target, shape=list(old.shape))
    ctx.captured.param_aliases[new_target] = [f"{lin.fqn}.weight"]
    lin.weight = new_target
    return new_target


def ensure_bias(ctx, lin: LinearSite) -> str:
    """Give ``lin`` a zero bias parameter if it has none (LayerNorm bias folding needs one)."""
    if lin.bias is not None:
        return lin.bias
    gm = ctx.gm
    w = ctx.captured.param(lin.weight)
    target = f"{lin.fqn}.bias"
    if _has_attr(gm, target):
        target = f"{lin.fqn}.bias_folded"
    set_attr(gm, target, nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False))
    with gm.graph.inserting_before(lin.node):
        attr = gm.graph.get_attr(target)
    attr.meta["val"] = torch.empty(w.shape[0], dtype=w.dtype, device="meta")
    args = list(lin.node.args)
    while len(args) < 3:
        args.append(None)
    args[2] = attr
    lin.node.args = tuple(args)
    lin.bias = target
    ctx.captured.param_aliases[target] = [f"{lin.fqn}.bias"]
    ctx.record(action="add_bias", module=lin.fqn, shape=[int(w.shape[0])])
    return target


def _has_attr(gm: nn.Module, target: str) -> bool:
    try:
        ctx_mod = gm
        *path, leaf = target.split(".")
        for p in path:
            ctx_mod = getattr(ctx_mod, p)
        return hasattr(ctx_mod, leaf)
    except AttributeError:
        return False


def scale_columns(ctx, lin: LinearSite, s: torch.Tensor) -> None:
    """W[:, j] *= s[j] (the linear's input channel j is divided by s[j] upstream)."""
    t = own_weight(ctx, lin)
    w = read(ctx, t)
    write(ctx, t, w * s.to(COMPUTE)[None, :])


def scale_rows(ctx, lin: LinearSite, s: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
    """W[i, :] /= s[i] and b[i] /= s[i] for output rows (optionally a slice of them)."""
    t = own_weight(ctx, lin)
    w = read(ctx, t)
    a, b = rows or (0, w.shape[0])
    w[a:b] /= s.to(COMPUTE)[:, None]
    write(ctx, t, w)
    if lin.bias is not None:
        bias = read(ctx, lin.bias)
        bias[a:b] /= s.to(COMPUTE)
        write(ctx, lin.bias, bias)
