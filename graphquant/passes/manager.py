"""Pass infrastructure: ``PassContext``, the pass registry, ``register_pass`` and ``PassManager``.

A pass is a plain function ``fn(ctx: PassContext) -> None`` that rewrites ``ctx.gm`` (weights or
nodes) and records what it changed with ``ctx.record(...)``. Passes belong to *stages*; a pass is
ordered by its stage and by ``before`` / ``after`` constraints naming passes or stages.

The contract of a user pass (see :func:`register_pass`):

- **Checked by default.** A pass that runs before quantization starts (stages ``prepare`` …
  ``online_rotate``, the default) must keep the float model's function: the equivalence guard
  compares the model's output after it with the output before any pass and raises
  ``EquivalenceError`` naming the pass. ``register_pass(..., check=False)`` opts out, for a pass
  that changes the function on purpose; ``quantize(..., check=False)`` turns every check off.
- **Errors name the pass.** An exception raised inside a pass reaches the caller as
  ``PassError("pass 'name' failed: ...")`` (the original is chained); graphquant's own errors keep
  their class.
- **Registration is explicit.** Registering a name twice raises ``PassError``
  (``replace=True`` replaces on purpose); built-in names cannot be taken.
- **Scoped when you want.** ``with graphquant.pass_scope(): ...`` removes every pass registered in
  the block when it ends; ``quantize(..., passes=[...])`` / ``rewrite(..., passes=[...])`` run exactly
  the user passes listed (names or decorated functions) instead of every registered one.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import networkx as nx

from ..errors import GraphQuantError, PassError

# stages in pipeline order; every built-in pass belongs to one
STAGES = ("prepare", "smooth", "norms", "rotate", "online_rotate", "algorithms", "quantize", "lower")
OFFLINE_STAGES = ("prepare", "smooth", "norms", "rotate")
#: from the first pass of these stages on, the model computes a quantized function: no more checks
QUANTIZING_STAGES = ("algorithms", "quantize", "lower")


@dataclass
class PassContext:
    """What a pass sees. A pass reads and rewrites ``ctx.gm`` and logs what it did with :meth:`record`.

    Attributes:
        captured: the :class:`~graphquant.capture.CapturedGraph` (``captured.gm`` is the graph module;
            ``captured.param(target)`` the tensor behind a ``get_attr`` target; ``captured.node_module(n)``
            the FQN of the module that produced node ``n``; calling ``captured(**inputs)`` runs the graph).
        report: the :class:`~graphquant.patterns.PatternReport` found on the graph before any pass
            (``report.patterns``, ``report.of_kind("norm_linear")``, ``report.residual_stream``).
        plan: the :class:`~graphquant.plan.Plan` (which built-in pass acts at which site).
        config: the quantization ``Config`` (``None`` in ``rewrite``).
        calib_data: the calibration batches as given (a list), or ``None``.
        stats: results passes hand to later passes and to the returned model (e.g. ``"lowering"``).
        log: every ``record``-ed entry so far, each ``{"pass": name, ...}``.
        current_pass: the name of the running pass.
    """

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
        """The graph module being rewritten (``captured.gm``)."""
        return self.captured.gm

    def record(self, **entry) -> None:
        """Append a log entry (module names, shapes, what changed) for the running pass."""
        self.log.append({"pass": self.current_pass, **entry})


@dataclass
class PassSpec:
    """A registered pass: its function, stage, ordering constraints and whether the equivalence
    guard checks it (``check``: True / False, or None = checked when it runs before quantization)."""

    name: str
    fn: Callable[[PassContext], None]
    stage: str
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    builtin: bool = False
    check: bool | None = None

    @property
    def offline(self) -> bool:  # the older name of check=True
        return bool(self.check)


_REGISTRY: dict[str, PassSpec] = {}
_SCOPES: list[list[str]] = []


def _as_tuple(x) -> tuple[str, ...]:
    if x is None:
        return ()
    if isinstance(x, str):
        return (x,)
    return tuple(x)


def register_pass(name: str, before=None, after=None, stage: str | None = None, *, check: bool | None = None,
                  replace: bool = False, offline: bool | None = None, _builtin: bool = False):
    """Register a rewrite pass (decorator): ``@register_pass("my_pass", after="rotate")``.

    Args:
        name: a new pass name (a name already registered raises ``PassError`` unless ``replace=True``;
            built-in names — smooth, fuse_norms, rotate_residual, … — are never replaced).
        before / after: pass or stage names (or lists of them). Stages, in order: prepare, smooth, norms,
            rotate, online_rotate, algorithms, quantize, lower.
        stage: the pass's stage; default ``online_rotate`` (after the offline rotations, before
            quantization).
        check: ``None`` (default): the equivalence guard checks the pass when it runs before quantization
            starts, i.e. it must keep the float function; ``False``: never checked (a pass that changes
            the function on purpose); ``True``: always checked (an error if it runs after quantization).
        replace: replace an existing user pass of the same name.
        offline: older spelling of ``check=True``.

    The function receives a :class:`PassContext` and returns nothing. Ordering constraints are
    validated when a pipeline is built: unknown names and cycles raise ``PassError``. A registered
    pass runs in every later ``quantize`` / ``rewrite`` until :func:`unregister_pass`, unless it was
    registered inside ``with pass_scope():`` or the call names its passes with ``passes=[...]``.
    """
    if not isinstance(name, str) or not name:
        raise PassError("register_pass needs a non-empty pass name")
    if stage is not None and stage not in STAGES:
        raise PassError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    if check is not None and not isinstance(check, bool):
        raise PassError(f"register_pass(check=...) takes True, False or None, got {check!r}")
    if offline is not None:
        check = bool(offline) if check is None else check

    def deco(fn):
        if not callable(fn):
            raise PassError(f"pass {name!r} must be a function taking a PassContext")
        old = _REGISTRY.get(name)
        if old is not None and old.builtin and not _builtin:
            raise PassError(f"{name!r} is a built-in pass; choose another name")
        if old is not None and not _builtin and not replace:
            raise PassError(f"a pass named {name!r} is already registered; choose another name, "
                            f"unregister_pass({name!r}) first, or pass replace=True")
        _REGISTRY[name] = PassSpec(name, fn, stage or ("online_rotate" if not _builtin else "prepare"),
                                   _as_tuple(before), _as_tuple(after), _builtin,
                                   check if not _builtin else bool(check))
        if _SCOPES and not _builtin:
            _SCOPES[-1].append(name)
        try:
            fn.__graphquant_pass__ = name
        except (AttributeError, TypeError):  # e.g. a bound method or builtin
            pass
        return fn

    return deco


def unregister_pass(name: str) -> None:
    """Remove a user pass (unknown names are ignored; built-in passes cannot be removed)."""
    spec = _REGISTRY.get(name)
    if spec is not None and spec.builtin:
        raise PassError(f"{name!r} is a built-in pass and cannot be unregistered")
    _REGISTRY.pop(name, None)


@contextlib.contextmanager
def pass_scope() -> Iterator[None]:
    """Passes registered inside ``with pass_scope():`` are unregistered when the block ends, so they
    cannot leak into later, unrelated ``quantize`` / ``rewrite`` calls."""
    _SCOPES.append([])
    try:
        yield
    finally:
        for name in _SCOPES.pop():
            spec = _REGISTRY.get(name)
            if spec is not None and not spec.builtin:
                _REGISTRY.pop(name, None)


def registered_passes() -> dict[str, PassSpec]:
    return dict(_REGISTRY)


def user_passes(selection=None) -> list[str]:
    """Names of the user passes a pipeline runs: every registered one (``selection=None``) or the
    ones listed in ``selection`` (names or functions decorated with ``register_pass``)."""
    if selection is None:
        return [n for n, s in _REGISTRY.items() if not s.builtin]
    if isinstance(selection, (str, bytes)) or callable(selection):
        selection = [selection]
    names = []
    for p in selection:
        name = p if isinstance(p, str) else getattr(p, "__graphquant_pass__", None)
        if name is None:
            raise PassError(f"passes=[...] takes pass names or functions decorated with @register_pass, got "
                            f"{getattr(p, '__name__', type(p).__name__)!r}; decorate it with "
                            "@graphquant.register_pass('name') first")
        spec = _REGISTRY.get(name)
        if spec is None:
            raise PassError(f"pass {name!r} is not registered (was it registered inside a pass_scope that "
                            f"ended?); registered user passes: {user_passes()}")
        if spec.builtin:
            raise PassError(f"{name!r} is a built-in pass; the plan chooses built-in passes from the config")
        names.append(name)
    return names


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
            try:
                spec.fn(ctx)
            except GraphQuantError:
                raise
            except Exception as e:  # noqa: BLE001 - re-raised with the pass's name, original chained
                first = next((line for line in str(e).splitlines() if line.strip()), "")
                where = "" if spec.builtin else f" (user pass registered with register_pass({name!r}))"
                raise PassError(f"pass {name!r} failed{where}: {type(e).__name__}: {first}") from e
            if len(ctx.log) == n_before:
                ctx.record(action="ran", note="no changes logged")
            ctx.gm.graph.lint()
            ctx.gm.recompile()
            if after_each is not None:
                after_each(name, ctx)
        ctx.current_pass = None
        return ctx
