"""``residual_stream``: the R1 domain, the set of tensors that share the hidden basis.

Built with networkx: graph nodes are ATen nodes, edges join a value to a consumer that keeps
it in the same basis (casts, eval dropout, channel-preserving reshapes, residual ``add``, scaling
by a scalar). The connected component holding the token embedding is the stream. Its boundary
tells the rest: Linears inside it are *writers* (rotate Qᵀ·W), norms and Linears reading it are
*readers* (W·Q after the norm weight is folded), any other consumer blocks R1.
"""
from __future__ import annotations

import networkx as nx
from torch import fx

from .base import AnalysisContext, Pattern
from .matcher import SINKS, aten, is_call, is_transparent, keeps_last_dim, shape_of, skip_transparent_back
from .sizes import hadamard_info

EMBEDDING = {aten.embedding.default}
METADATA_READS = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default}


def _scalar_mul(node: fx.Node) -> bool:
    if not is_call(node, (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)):
        return False
    other = node.args[1] if len(node.args) > 1 else None
    if not isinstance(other, fx.Node):
        return True
    src = skip_transparent_back(other)
    s = shape_of(src)
    return s is not None and all(int(d) == 1 for d in s)


def _stream_edges(graph: fx.Graph) -> nx.Graph:
    g = nx.Graph()
    for u in graph.nodes:
        if u.op != "call_function":
            continue
        if is_transparent(u) or keeps_last_dim(u) or _scalar_mul(u):
            src = u.args[0]
            if isinstance(src, fx.Node):
                g.add_edge(src, u)
        elif is_call(u, (aten.add.Tensor, aten.sub.Tensor)) and all(isinstance(a, fx.Node) for a in u.args[:2]):
            sa, sb, so = shape_of(u.args[0]), shape_of(u.args[1]), shape_of(u)
            if sa and sb and so and str(sa[-1]) == str(sb[-1]) == str(so[-1]) and len(sa) > 1 and len(sb) > 1:
                g.add_edge(u.args[0], u)
                g.add_edge(u.args[1], u)
    return g


def residual_stream(ctx: AnalysisContext) -> list[Pattern]:
    graph = ctx.graph
    cfg = ctx.captured.config
    vocab = getattr(cfg, "vocab_size", None)
    embeds = [n for n in graph.nodes if is_call(n, EMBEDDING) and isinstance(n.args[0], fx.Node)
              and n.args[0].op == "get_attr"]
    token_embeds = [e for e in embeds if vocab is None or int(ctx.captured.param(str(e.args[0].target)).shape[0]) == vocab]
    if not token_embeds:
        return []
    g = _stream_edges(graph)
    seed = token_embeds[0]
    if seed not in g:
        g.add_node(seed)
    domain: set = nx.node_connected_component(g, seed)
    # post-LN: a norm reads the stream and its output is added back into a residual, so the
    # stream continues after the norm; grow the domain through such norms
    post_ln = []
    grown = True
    while grown:
        grown = False
        for s in ctx.norms:
            if s.input in domain and s.output not in domain and _feeds_add(s.output):
                post_ln.append(s)
                if s.output in g:
                    domain |= nx.node_connected_component(g, s.output)
                grown = True

    norm_of_internal = {}
    for s in ctx.norms:
        for n in s.internal:
            norm_of_internal[n] = s
    writers, embeddings, norm_readers, direct_readers, blockers, outputs = [], [], [], [], [], []
    for n in graph.nodes:
        if n not in domain:
            continue
        lin = ctx.linear(n)
        if lin is not None:
            writers.append(lin)
        elif is_call(n, EMBEDDING):
            embeddings.append(n)
        for u in n.users:
            if u in domain or is_call(u, SINKS) or is_call(u, METADATA_READS):
                continue
            if is_call(u, aten.type_as.default) and u.args[0] is not n:
                continue  # reads only the dtype
            if u.op == "output":
                outputs.append(n)
                continue
            s = norm_of_internal.get(u)
            if s is not None and s.input in domain:
                if s not in norm_readers:
                    norm_readers.append(s)
                continue
            ul = ctx.linear(u)
            if ul is not None and u.args[0] is n:
                if all(d.node is not ul.node for d in direct_readers):
                    direct_readers.append(ul)
                continue
            if ul is not None:
                continue  # the stream is the weight of a linear? (not expected)
            blockers.append(f"non-linear op {u.target} ({ctx.captured.node_module(u) or 'top level'}) reads the "
                            "residual stream")
    norm_readers += [s for s in post_ln if s not in norm_readers]
    hidden = ctx.dim(seed)
    # a linear reading a post-LN norm's output is found both via the norm and directly: list it once
    readers_linears = list({lin.node: lin for lin in [lin for s in norm_readers for lin in s.linears]
                            + direct_readers}.values())
    lm_head = next((lin for lin in readers_linears if _reaches_output(lin.node)
                    and (vocab is None or lin.out_features == vocab)), None)
    final_norm = next((s for s in norm_readers if lm_head is not None and lm_head in s.linears), None)
    modules = [ctx.captured.node_module(e) for e in embeddings] + [w.fqn for w in writers] + \
              [s.fqn for s in norm_readers] + [lin.fqn for lin in readers_linears]
    p = Pattern("residual_stream", list(dict.fromkeys(m for m in modules if m)), applies=["R1"],
                details={"hidden_size": int(hidden) if hidden is not None else None,
                         "embeddings": [ctx.captured.node_module(e) for e in embeddings],
                         "embedding_weights": [str(e.args[0].target) for e in embeddings],
                         "writers": [w.fqn for w in writers],
                         "norms": [s.fqn for s in norm_readers],
                         "readers": [lin.fqn for lin in readers_linears],
                         "final_norm": final_norm.fqn if final_norm else None,
                         "lm_head": lm_head.fqn if lm_head else None,
                         "domain_size": len(domain),
                         "hadamard": hadamard_info(hidden)},
                nodes={"embeddings": embeddings, "writers": writers, "norms": norm_readers,
                       "direct_readers": direct_readers, "readers": readers_linears, "domain": domain})
    if post_ln:
        p.block("R1", "post-LN placement: the residual stream is normalised in place by "
                      f"{', '.join(s.fqn for s in post_ln[:3])}{' ...' if len(post_ln) > 3 else ''}, "
                      "so no rotation commutes with it")
    if outputs:
        p.block("R1", "the residual stream is a model output (e.g. last_hidden_state); rotating it would change "
                      "the output")
    for b in dict.fromkeys(blockers):
        p.block("R1", b)
    layer_norms = [s for s in norm_readers if s.kind == "layer_norm"]
    if layer_norms and "R1" in p.applies:
        p.requires.setdefault("R1", []).append(
            f"convert LayerNorm to RMSNorm ({len(layer_norms)} norms: mean-centering folded into writers and "
            "embeddings, bias folded into readers)")
        p.details["layernorm_needs_conversion"] = True
    elif layer_norms:
        p.details["layernorm_needs_conversion"] = True
    weightful = [s for s in norm_readers if s.weight is not None and s.kind != "layer_norm"]
    if weightful and "R1" in p.applies:
        p.requires.setdefault("R1", []).append("fold norm weights into the Linears that read them (fuse_norms)")
    tied = [e for e in embeddings if any(lin.weight == str(e.args[0].target) for lin in readers_linears)]
    if tied:
        p.details["tied_embeddings"] = True
        if "R1" in p.applies:
            p.requires.setdefault("R1", []).append("untie embeddings: the embedding and lm_head share one tensor")
    if not p.details["hadamard"]["supported"]:
        p.details["rotation_note"] = "hidden size has no Hadamard construction: use a random orthogonal R1"
    return [p]


def _feeds_add(node: fx.Node) -> bool:
    from .matcher import users_through_transparent

    return any(is_call(u, aten.add.Tensor) and all(isinstance(a, fx.Node) for a in u.args[:2])
               for u in users_through_transparent(node, through_views=True))


def _reaches_output(node: fx.Node, depth: int = 6) -> bool:
    """True when ``node``'s value is returned by the graph (through casts, views and slices)."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u.op == "output":
                    return True
                if is_transparent(u) or is_call(u, (aten.slice.Tensor, aten.view.default, aten.reshape.default,
                                                    aten._unsafe_view.default, aten.contiguous.default)):
                    nxt.append(u)
        frontier = nxt
    return False
