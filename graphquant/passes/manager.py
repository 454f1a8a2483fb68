"""Pass infrastructure: ``PassContext``, the pass registry, ``register_pass`` and ``PassManager``.

A pass is a plain function ``fn(ctx: PassContext) -> None`` that rewrites ``ctx.gm`` (weights or
nodes) and records what it changed with ``ctx.record(...)``. Passes belong to *stages*; a pass is
ordered by its stage and by ``before`` / ``after`` constraints naming passes or stages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx

from ..errors import PassError

# stages in pipeline order; every built-in pass belongs to one
STAGES = ("prepare", "smooth", "norms", "rotate", "online_rotate", "algorithms", "quantize", "lower")
OFFLINE_STAGES = ("prepare", "smooth", "norms", "rotate")


@dataclass
class PassContext:
    """What a pass sees: the captured graph, the pattern report, the plan, calibration statistics
    and the log. ``gm`` is the graph module being rewritten."""

    captured: Any  # CapturedGraph
    report: Any  # PatternReport
    plan: Any = None  # Plan
    config: Any = None  # graphquant.config.Config or None
    calib_data: Any = None
    stats: dict = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)
    current_pass: str | None = None

    @property
    def gm(self):
        return self.captured.gm

    def record(self, **entry) -> None:
        """Append a log entry (module names, shapes, what changed) for the running pass."""
        self.log.append({"pass": self.current_pass, **entry})


@dataclass
class PassSpec:
    name: str
    fn: Callable[[PassContext], None]
    stage: str
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    builtin: bool = False
    offline: bool = False  # an offline weight rewrite that must keep the float function


_REGISTRY: dict[str, PassSpec] = {}


def _as_tuple(x) -> tuple[str, ...]:
    if x is None:
        return ()
    if isinstance(x, str):
        return (x,)
    return tuple(x)


def register_pass(name: str, before=None, after=None, stage: str | None = None, *, _builtin: bool = False,
                  offline: bool = False):
    """Register a rewrite pass (decorator). ``before`` / ``after``: pass or stage names (stages:
    prepare, smooth, norms, rotate, online_rotate, algorithms, quantize, lower). A user pass
    without constraints runs in the ``online_rotate`` stage: after the offline rotations, before
    quantization.

    Ordering constraints are validated when a pipeline is built: unknown names and cycles raise
    ``graphquant.PassError``.
    """
    if not isinstance(name, str) or not name:
        raise PassError("register_pass needs a non-empty pass name")
    if stage is not None and stage not in STAGES:
        raise PassError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")

    def deco(fn):
        if not callable(fn):
            raise PassError(f"pass {name!r} must be a function taking a PassContext")
        if name in _REGISTRY and _REGISTRY[name].builtin and not _builtin:
            raise PassError(f"{name!r} is a built-in pass; choose another name")
        _REGISTRY[name] = PassSpec(name, fn, stage or ("online_rotate" if not _builtin else "prepare"),
                                   _as_tuple(before), _as_tuple(after), _builtin, offline)
        return fn

    return deco


def unregister_pass(name: str) -> None:
    spec = _REGISTRY.get(name)
    if spec is not None and spec.builtin:
        raise PassError(f"{name!r} is a built-in pass and cannot be unregistered")
    _REGISTRY.pop(name, None)


def registered_passes() -> dict[str, PassSpec]:
    return dict(_REGISTRY)


def user_passes() -> list[str]:
    return [n for n, s in _REGISTRY.items() if not s.builtin]


class PassManager:
    """Orders and runs passes. ``passes``: names of the passes to run (built-ins chosen by the
    plan plus every registered user pass)."""

    def __init__(self, passes: list[str]):
        unknown = [p for p in passes if p not in _REGISTRY]
        if unknown:
            raise PassError(f"unknown pass(es) {unknown}; registered: {sorted(_REGISTRY)}")
        self.order = self._order(list(dict.fromkeys(passes)))

    @staticmethod
    def _order(names: list[str]) -> list[str]:
        specs = {n: _REGISTRY[n] for n in names}
        known = set(_REGISTRY) | set(STAGES)
        g = nx.DiGraph()
        g.add_nodes_from(names)
        stage_rank = {s: i for i, s in enumerate(STAGES)}

        def members(ref: str) -> list[str]:
            if ref in stage_rank:
                return [n for n in names if specs[n].stage == ref]
            return [ref] if ref in specs else []

        for n, s in specs.items():
            for ref in s.before + s.after:
                if ref not in known:
                    raise PassError(f"pass {n!r}: unknown pass or stage {ref!r} in before/after; known passes: "
                                    f"{sorted(_REGISTRY)}, stages: {list(STAGES)}")
            for ref in s.after:
                for m in members(ref):
                    if m != n:
                        g.add_edge(m, n)
            for ref in s.before:
                for m in members(ref):
                    if m != n:
                        g.add_edge(n, m)
        # stage order for passes without an explicit relation between them
        for a in names:
            for b in names:
                if a != b and stage_rank[specs[a].stage] < stage_rank[specs[b].stage] and not g.has_edge(b, a):
                    if not nx.has_path(g, b, a):
                        g.add_edge(a, b)
        try:
            cycle = nx.find_cycle(g)
        except nx.NetworkXNoCycle:
            cycle = None
        if cycle:
            raise PassError("pass ordering constraints form a cycle: " + " -> ".join(f"{u}" for u, _ in cycle)
                            + f" -> {cycle[0][0]}")
        index = {n: i for i, n in enumerate(names)}
        return list(nx.lexicographical_topological_sort(g, key=lambda n: (stage_rank[specs[n].stage], index[n])))

    def run(self, ctx: PassContext, after_each: Callable[[str, PassContext], None] | None = None) -> PassContext:
        for name in self.order:
            spec = _REGISTRY[name]
            ctx.current_pass = name
            n_before = len(ctx.log)
            spec.fn(ctx)
            if len(ctx.log) == n_before:
                ctx.record(action="ran", note="no changes logged")
            ctx.gm.graph.lint()
            ctx.gm.recompile()
            if after_each is not None:
                after_each(name, ctx)
        ctx.current_pass = None
        return ctx
