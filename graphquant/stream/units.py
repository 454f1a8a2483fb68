"""The captured graph cut into *units*: the stretches of graph whose weights are resident together.

The layer-by-layer runner's blocks (one per decoder layer, one for ``lm_head``) cut the graph at
their starts: unit 0 is everything before the first block (the embedding, RoPE tables, masks),
then one unit per block's stretch (from its start to the next block's start). A parameter belongs
to the unit of its first reader; a module to the unit of its first node. A rewrite site whose
nodes fall in two units (the final norm folded into ``lm_head``) merges them, so every offline
rewrite sees all the weights it touches. Every pattern site is given to exactly one unit, so
running the passes unit by unit does each site's rewrite exactly once, as the in-memory pipeline does.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import fx

from ..capture import node_module_fqn
from ..errors import UnsupportedModelError
from ..layerwise import Block, make_blocks
from ..patterns.base import AnalysisContext


@dataclass
class Unit:
    index: int
    blocks: list[Block] = field(default_factory=list)  # runner blocks in this unit (none for the prologue)
    nodes: set = field(default_factory=set)  # graph nodes of its stretch (as captured)
    targets: list[str] = field(default_factory=list)  # get_attr targets read first here (loaded with the unit)
    modules: set = field(default_factory=set)  # module FQNs whose first node lies here

    @property
    def name(self) -> str:
        return "+".join(b.key for b in self.blocks) if self.blocks else "embeddings"


def _first_reader(n: fx.Node, idx: dict) -> int | None:
    users = [idx[u] for u in n.users if u in idx]
    return min(users) if users else None


def make_units(captured, plan) -> tuple[list[Unit], list[Block]]:
    """The units of ``captured`` for ``plan`` (see the module docstring) and the runner blocks."""
    gm = captured.gm
    linears = list(AnalysisContext(captured).linears.values())
    blocks = make_blocks(gm, linears)
    if not blocks:
        raise UnsupportedModelError("streamed quantization needs Linear layers in the graph; found none")
    nodes = list(gm.graph.nodes)
    idx = {n: i for i, n in enumerate(nodes)}
    starts = [idx[b.start] for b in blocks]
    bounds = [0] + starts + [len(nodes)]

    def stretch_of(i: int) -> int:  # 0 = prologue, k + 1 = block k's stretch
        k = 0
        while k + 1 < len(bounds) - 1 and i >= bounds[k + 1]:
            k += 1
        return k

    owner = [stretch_of(i) for i in range(len(nodes))]
    # sites whose nodes span stretches merge them
    parent = list(range(len(blocks) + 1))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def join(node_list):
        ks = sorted({owner[idx[n]] for n in node_list if n in idx})
        for a, b in zip(ks, ks[1:]):
            for k in range(a, b):  # keep units contiguous
                parent[find(k + 1)] = find(k)

    def on_meta(n):
        return n.op == "get_attr" and captured.param(str(n.target)).device.type == "meta"

    for n in nodes:  # a weight read in several stretches (tied embeddings) must be resident in all of them
        if on_meta(n):
            join(list(n.users))
    for nodes_of_site in site_nodes(plan):
        join(nodes_of_site)
    groups: dict[int, Unit] = {}
    for k in range(len(blocks) + 1):
        r = find(k)
        u = groups.setdefault(r, Unit(len(groups)))
        if k:
            u.blocks.append(blocks[k - 1])
    unit_of_stretch = {k: groups[find(k)] for k in range(len(blocks) + 1)}
    units = sorted(groups.values(), key=lambda u: u.index)
    if units[0].blocks:
        raise UnsupportedModelError("streamed quantization cannot separate the embedding from the layers: a weight is "
                                    "read in both (tied embeddings: tie_word_embeddings=True) or a rewrite spans "
                                    "them. Save the model untied, or use graphquant.quantize() on the loaded model")
    for n, k in zip(nodes, owner):
        unit = unit_of_stretch[k]
        unit.nodes.add(n)
        fqn = node_module_fqn(n)
        if fqn and not any(fqn in u.modules for u in units):
            unit.modules.add(fqn)
    seen = set()
    for n in nodes:
        if on_meta(n) and n.target not in seen:
            first = _first_reader(n, idx)
            if first is not None:
                seen.add(n.target)
                unit_of_stretch[owner[first]].targets.append(str(n.target))
    return units, blocks


def site_nodes(plan) -> list[list[fx.Node]]:
    """The graph nodes each planned rewrite site touches (they must land in one unit)."""
    out = []
    for p in plan.fuse_norms:
        norm = p.nodes["norm"]
        out.append([norm.output] + [lin.node for lin in norm.linears])
    if plan.r2 is not None:
        out += [[p.nodes["v_proj"].node, p.nodes["o_proj"].node] for p in plan.r2.sites]
    return out


def _site_node(kind: str, p) -> fx.Node:
    if kind == "fuse_norms":
        return p.nodes["norm"].output
    if kind == "r2":
        return p.nodes["v_proj"].node
    if kind == "r4":
        return p.nodes["consumer"].node
    if kind == "r3":
        site = p.nodes["site"]
        return site.out if site.kind == "sdpa" else site.q
    raise KeyError(kind)


class ScopedPlans:
    """Per unit, a copy of the plan that names only the unit's sites (computed once, from the
    graph as captured, so later graph changes do not move a site to another unit)."""

    def __init__(self, plan, units: list[Unit]):
        self.plan = plan
        unit_of = {}
        for u in units:
            for n in u.nodes:
                unit_of[n] = u.index
        self.fuse = {u.index: [] for u in units}
        self.sites = {k: {u.index: [] for u in units} for k in ("r2", "r3", "r4")}
        for p in plan.fuse_norms:
            self.fuse[unit_of[_site_node("fuse_norms", p)]].append(p)
        for k in ("r2", "r3", "r4"):
            rp = getattr(plan, k)
            for p in (rp.sites if rp is not None else []):
                self.sites[k][unit_of[_site_node(k, p)]].append(p)
        self.r1 = {u.index: None for u in units}
        if plan.r1 is not None:
            rs = plan.r1.sites[0]
            for u in units:
                scoped = copy.copy(rs)
                scoped.nodes = dict(rs.nodes)
                scoped.nodes["embeddings"] = [e for e in rs.nodes["embeddings"] if e in u.nodes]
                scoped.nodes["writers"] = [lin for lin in rs.nodes["writers"] if lin.node in u.nodes]
                scoped.nodes["readers"] = [lin for lin in rs.nodes["readers"] if lin.node in u.nodes]
                scoped.nodes["norms"] = [nm for nm in rs.nodes["norms"] if nm.output in u.nodes]
                self.r1[u.index] = scoped

    def for_unit(self, unit: Unit):
        from ..plan import RotationPlan

        plan = copy.copy(self.plan)
        plan.smooth = None
        plan.fuse_norms = self.fuse[unit.index]
        if self.plan.r1 is not None:
            plan.r1 = RotationPlan(self.plan.r1.kind, self.plan.r1.seed, [self.r1[unit.index]])
        for k in ("r2", "r3", "r4"):
            rp = getattr(self.plan, k)
            if rp is not None:
                setattr(plan, k, RotationPlan(rp.kind, rp.seed, self.sites[k][unit.index]))
        return plan
