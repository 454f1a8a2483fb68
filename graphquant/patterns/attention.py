"""Attention sites: ``attention_vo`` (V projection -> heads -> attention -> merge -> O projection,
the R2 and v->o smoothing site) and ``attention_qk`` (Q and K after RoPE, the R3 and KV-cache site).

Attention is found as ``aten.scaled_dot_product_attention`` or in eager form
``matmul(softmax(matmul(q, k^T) ...), v)``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ..capture import node_module_fqn
from .base import AnalysisContext, LinearSite, Pattern, layer_index
from .matcher import SDPA, VIEWS, aten, is_call, is_transparent, shape_of, skip_transparent_back
from .sizes import hadamard_info

SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default} if hasattr(aten, "_safe_softmax") \
    else {aten._softmax.default, aten.softmax.int}
MATMUL = {aten.matmul.default, aten.bmm.default}
# ops that move whole heads around (reshape/transposes/GQA repeat) without mixing channels
HEAD_MOVES = VIEWS | {aten.repeat_interleave.self_int, aten.repeat.default, aten.clone.default,
                      aten.contiguous.default}


@dataclass
class AttentionSite:
    kind: str  # "sdpa" | "eager"
    q: fx.Node  # the query tensor as attention reads it (post-RoPE)
    k: fx.Node
    v: fx.Node
    out: fx.Node  # attention output (before heads are merged)
    fqn: str


def find_attention(ctx: AnalysisContext) -> list[AttentionSite]:
    sites = []
    for n in ctx.graph.nodes:
        if is_call(n, SDPA):
            sites.append(AttentionSite("sdpa", n.args[0], n.args[1], n.args[2], n, node_module_fqn(n)))
        elif is_call(n, MATMUL):
            probs = skip_transparent_back(n.args[0])
            if not is_call(probs, SOFTMAX):
                continue
            scores = probs.args[0]
            qk = _find_back(scores, lambda x: is_call(x, MATMUL), {aten.add.Tensor, aten.mul.Tensor,
                                                                   aten.div.Tensor, aten.masked_fill.Scalar,
                                                                   aten.masked_fill.Tensor})
            if qk is None:
                continue
            k = qk.args[1]
            kt = skip_transparent_back(k)
            if is_call(kt, aten.transpose.int):
                k = kt.args[0]
            sites.append(AttentionSite("eager", qk.args[0], k, n.args[1], n, node_module_fqn(n)))
    return sites


def _find_back(node, pred, through: set, depth: int = 8):
    for _ in range(depth):
        node = skip_transparent_back(node)
        if not isinstance(node, fx.Node):
            return None
        if pred(node):
            return node
        if node.op != "call_function" or node.target not in through:
            return None
        node = next((a for a in node.args if isinstance(a, fx.Node) and shape_of(a) and len(shape_of(a)) >= 3),
                    node.args[0])
    return None


def _trace_to_projection(ctx: AnalysisContext, node) -> tuple[LinearSite | None, tuple | None, list]:
    """Walk up from an attention input through head moves to the Linear that produced it.
    Returns the linear, the channel slice of its output (fused qkv) and the ops passed."""
    ops = []
    sl = None
    while isinstance(node, fx.Node):
        lin = ctx.linear(node)
        if lin is not None:
            return lin, sl, ops
        if is_transparent(node):
            node = node.args[0]
            continue
        if is_call(node, aten.slice.Tensor):
            src = shape_of(node.args[0])
            if src and node.args[1] % len(src) == len(src) - 1 and ctx.linear(skip_transparent_back(node.args[0])):
                start = int(node.args[2])
                end = node.args[3] if len(node.args) > 3 else None
                end = min(int(end), int(src[-1])) if isinstance(end, int) else int(src[-1])
                if (start, end) != (0, int(src[-1])):
                    sl = (start, end)
                node = node.args[0]
                ops.append(node)
                continue
        if is_call(node, HEAD_MOVES):
            ops.append(node)
            node = node.args[0]
            continue
        return None, None, ops
    return None, None, ops


def _trace_to_consumer(ctx: AnalysisContext, node) -> LinearSite | None:
    """Walk down from the attention output through head merges to the output projection."""
    for _ in range(8):
        users = [u for u in node.users if not is_call(u, aten._assert_tensor_metadata.default)]
        if len(users) != 1:
            return None
        u = users[0]
        lin = ctx.linear(u)
        if lin is not None:
            return lin if u.args[0] is node else None
        if is_transparent(u) or is_call(u, HEAD_MOVES):
            node = u
            continue
        return None
    return None


def _has_rope(node) -> bool:
    """A RoPE application looks like ``x * cos + rotate(x) * sin`` (rotate = cat of negated halves)."""
    for _ in range(6):
        node = skip_transparent_back(node)
        if not isinstance(node, fx.Node):
            return False
        if is_call(node, aten.add.Tensor) and all(is_call(skip_transparent_back(a), aten.mul.Tensor)
                                                    for a in node.args[:2] if isinstance(a, fx.Node)):
            return True
        if is_call(node, aten.cat.default):  # partial rotary: cat([rope(x[..., :r]), x[..., r:]])
            return any(_has_rope(a) for a in node.args[0])
        if node.op != "call_function" or not node.args:
            return False
        node = node.args[0]
    return False


def attention_sites(ctx: AnalysisContext) -> list[AttentionSite]:
    if not hasattr(ctx, "_attention"):
        ctx._attention = find_attention(ctx)
    return ctx._attention


def attention_vo(ctx: AnalysisContext) -> list[Pattern]:
    out = []
    for site in attention_sites(ctx):
        v_lin, v_slice, _ = _trace_to_projection(ctx, site.v)
        o_lin = _trace_to_consumer(ctx, site.out)
        if v_lin is None or o_lin is None:
            continue
        qs, vs = shape_of(site.q), shape_of(site.v)
        head_dim = int(vs[-1])
        num_heads = int(qs[1]) if qs and len(qs) == 4 else o_lin.in_features // head_dim
        v_width = (v_slice[1] - v_slice[0]) if v_slice else v_lin.out_features
        num_kv_heads = v_width // head_dim
        p = Pattern("attention_vo", [v_lin.fqn, o_lin.fqn], applies=["smooth", "R2"],
                    layer=layer_index(o_lin.fqn),
                    details={"v_proj": v_lin.fqn, "o_proj": o_lin.fqn, "head_dim": head_dim, "num_heads": num_heads,
                             "num_kv_heads": num_kv_heads, "v_slice": v_slice, "attention": site.kind,
                             "hadamard": hadamard_info(head_dim)},
                    nodes={"v_proj": v_lin, "o_proj": o_lin, "site": site})
        if num_heads * head_dim != o_lin.in_features:
            p.block("R2", f"o_proj in_features {o_lin.in_features} != heads {num_heads} x head_dim {head_dim}")
            p.block("smooth", "head layout of o_proj input not understood")
        if num_kv_heads == 0 or num_heads % max(num_kv_heads, 1):
            p.block("R2", f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
        out.append(p)
    return out


def attention_qk(ctx: AnalysisContext) -> list[Pattern]:
    out = []
    for site in attention_sites(ctx):
        q_lin, _ = _find_projection(ctx, site.q)
        k_lin, _ = _find_projection(ctx, site.k)
        qs, ks = shape_of(site.q), shape_of(site.k)
        head_dim = int(qs[-1])
        mods = [m.fqn for m in (q_lin, k_lin) if m is not None]
        mods = list(dict.fromkeys(mods)) or [site.fqn]
        rope = _has_rope(site.q) and _has_rope(site.k)
        p = Pattern("attention_qk", mods, applies=["R3"], layer=layer_index(site.fqn) if site.fqn else None,
                    details={"attention": site.fqn, "q_proj": q_lin.fqn if q_lin else None,
                             "k_proj": k_lin.fqn if k_lin else None, "head_dim": head_dim,
                             "num_heads": int(qs[1]) if qs and len(qs) == 4 else None,
                             "rope": rope, "kv_cache_site": True, "hadamard": hadamard_info(head_dim)},
                    nodes={"site": site, "q": site.q, "k": site.k, "v": site.v})
        if not p.details["hadamard"]["supported"]:
            p.block("R3", f"head_dim {head_dim}: {p.details['hadamard']['reason']}")
        out.append(p)
    return out


def _find_projection(ctx: AnalysisContext, node, max_nodes: int = 64) -> tuple[LinearSite | None, tuple | None]:
    """Breadth-first walk up from a post-RoPE query/key to the nearest Linear (through RoPE, q/k norms,
    scalings and head moves). Returns the linear and the channel slice of its output (fused qkv)."""
    from collections import deque

    queue, seen = deque([(node, None)]), set()
    while queue and len(seen) < max_nodes:
        n, child = queue.popleft()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        lin = ctx.linear(n)
        if lin is not None:
            sl = None
            if is_call(child, aten.slice.Tensor):
                src = shape_of(n)
                start = int(child.args[2])
                end = child.args[3] if len(child.args) > 3 else None
                end = min(int(end), int(src[-1])) if isinstance(end, int) else int(src[-1])
                sl = (start, end) if (start, end) != (0, int(src[-1])) else None
            return lin, sl
        if n.op != "call_function":
            continue
        for a in n.all_input_nodes:
            if a.op == "call_function":
                queue.append((a, n))
    return None, None
