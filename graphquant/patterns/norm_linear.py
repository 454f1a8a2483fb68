"""``norm_linear``: an RMSNorm or LayerNorm whose output feeds one or more Linear layers.

Recognised norm forms (on the ATen graph, casts looked through):
- decomposed RMSNorm: ``x * rsqrt(mean(x**2, -1, keepdim) + eps)`` then ``* w`` (Llama, Qwen, Mistral, Phi3);
- Gemma's offset form: ``... * (1 + w)``;
- ``aten.rms_norm`` and ``aten.layer_norm`` / ``aten.native_layer_norm`` ops.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from ..capture import node_module_fqn
from .base import AnalysisContext, LinearSite, Pattern, layer_index
from .matcher import (ANY, LINEAR, Const, Op, Var, aten, is_call, match, skip_transparent_back,
                      users_through_transparent)


@dataclass
class NormSite:
    kind: str  # "rms" | "rms_offset" | "layer_norm"
    fqn: str
    input: fx.Node  # the normalised tensor (before casts)
    output: fx.Node  # the node after the weight (and bias) are applied
    weight: str | None  # get_attr target
    bias: str | None
    eps: float
    internal: set = field(default_factory=set)  # nodes of the norm computation
    linears: list[LinearSite] = field(default_factory=list)
    other_users: list[fx.Node] = field(default_factory=list)

    @property
    def hidden(self) -> int | None:
        from .matcher import last_dim

        d = last_dim(self.output)
        return int(d) if isinstance(d, int) else None


_param = lambda n: isinstance(n, fx.Node) and n.op == "get_attr"  # noqa: E731

RMS_CORE = Op(aten.mul.Tensor, Var("x"),
              Op(aten.rsqrt.default,
                 Op(aten.add.Tensor, Op(aten.mean.dim, Op(aten.pow.Tensor_Scalar, Var("x"), 2), ANY, ANY),
                    Var("eps"), name="add_eps"), name="rsqrt"),
              name="normed", commutative=True)
WEIGHT_MUL = Op(aten.mul.Tensor, Var("normed"), Var("w", where=_param), name="out", commutative=True)
OFFSET_WEIGHT_MUL = Op(aten.mul.Tensor, Var("normed"),
                       Op(aten.add.Tensor, Var("w", where=_param), Const(lambda c: c == 1), name="offset",
                          commutative=True),
                       name="out", commutative=True)


def _decomposed_rms(ctx: AnalysisContext) -> list[NormSite]:
    sites = []
    for n in ctx.graph.nodes:
        if not is_call(n, aten.mul.Tensor):
            continue
        b = match(RMS_CORE, n)
        if b is None:
            continue
        normed = b["normed"]
        site = None
        for u in users_through_transparent(normed):
            for pat, kind in ((OFFSET_WEIGHT_MUL, "rms_offset"), (WEIGHT_MUL, "rms")):
                wb = match(pat, u)
                if wb is not None and wb["normed"] is normed:
                    internal = {normed, b["rsqrt"], b["add_eps"], wb["out"]} | ({wb["offset"]} if "offset" in wb else set())
                    site = NormSite(kind, node_module_fqn(normed), b["x"], wb["out"], str(wb["w"].target), None,
                                    float(b["eps"]) if isinstance(b["eps"], (int, float)) else 0.0, internal)
                    break
            if site:
                break
        if site is None:  # weightless RMSNorm
            site = NormSite("rms", node_module_fqn(normed), b["x"], normed, None, None,
                            float(b["eps"]) if isinstance(b["eps"], (int, float)) else 0.0,
                            {normed, b["rsqrt"], b["add_eps"]})
        site.internal |= _ancestors_within(site.output, site.input)
        sites.append(site)
    return sites


def _ancestors_within(out: fx.Node, stop: fx.Node) -> set:
    """All nodes between ``stop`` (exclusive) and ``out`` (inclusive) that compute the norm."""
    seen, stack = set(), [out]
    while stack:
        n = stack.pop()
        if n in seen or n is stop or not isinstance(n, fx.Node) or n.op != "call_function":
            continue
        seen.add(n)
        stack.extend(a for a in n.all_input_nodes if a.op == "call_function")
    return seen


def _op_norms(ctx: AnalysisContext) -> list[NormSite]:
    sites = []
    for n in ctx.graph.nodes:
        if is_call(n, (aten.layer_norm.default, aten.native_layer_norm.default)):
            x, _shape = n.args[0], n.args[1]
            w = skip_transparent_back(n.args[2]) if len(n.args) > 2 and n.args[2] is not None else None
            bias = skip_transparent_back(n.args[3]) if len(n.args) > 3 and n.args[3] is not None else None
            eps = n.args[4] if len(n.args) > 4 else 1e-5
            out = n
            if n.target == aten.native_layer_norm.default:
                out = next((u for u in n.users if u.target.__name__ == "getitem" and u.args[1] == 0), n)
            sites.append(NormSite("layer_norm", node_module_fqn(n), skip_transparent_back(x), out,
                                  str(w.target) if _param(w) else None, str(bias.target) if _param(bias) else None,
                                  float(eps), {n, out}))
        elif is_call(n, aten.rms_norm.default):
            x = n.args[0]
            w = skip_transparent_back(n.args[2]) if len(n.args) > 2 and n.args[2] is not None else None
            eps = n.args[3] if len(n.args) > 3 and n.args[3] is not None else 1e-6
            sites.append(NormSite("rms", node_module_fqn(n), skip_transparent_back(x), n,
                                  str(w.target) if _param(w) else None, None, float(eps), {n}))
    return sites


def find_norms(ctx: AnalysisContext) -> list[NormSite]:
    sites = _decomposed_rms(ctx) + _op_norms(ctx)
    for s in sites:
        for u in users_through_transparent(s.output, through_views=True):
            lin = ctx.linear(u)
            if lin is not None and skip_transparent_back(u.args[0]) is not None and _reads(u, s.output):
                s.linears.append(lin)
            else:
                s.other_users.append(u)
    order = {n: i for i, n in enumerate(ctx.graph.nodes)}
    sites.sort(key=lambda s: order[s.output])
    return sites


def _reads(linear: fx.Node, value: fx.Node) -> bool:
    from .matcher import producer_through_views

    return producer_through_views(linear.args[0]) is producer_through_views(value)


def norm_linear(ctx: AnalysisContext) -> list[Pattern]:
    ctx.norms = find_norms(ctx)
    out = []
    for s in ctx.norms:
        if not s.linears:
            continue
        p = Pattern("norm_linear", [s.fqn] + [lin.fqn for lin in s.linears], applies=["smooth", "R1"],
                    layer=layer_index(s.fqn) if layer_index(s.fqn) is not None else layer_index(s.linears[0].fqn),
                    details={"norm_kind": s.kind, "hidden_size": s.hidden, "eps": s.eps,
                             "linears": [lin.fqn for lin in s.linears],
                             "out_features": [lin.out_features for lin in s.linears]},
                    nodes={"norm": s})
        if s.weight is None:
            p.block("smooth", "the norm has no weight to fold smoothing scales into")
        if s.other_users:
            what = ", ".join(sorted({str(u.target) for u in s.other_users}))
            p.block("smooth", f"the norm output also feeds non-Linear ops ({what}); scaling it would change them")
        out.append(p)
    return out
