"""Pattern records, the analysis context shared by pattern families, and the pattern registry."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx

from ..capture import CapturedGraph, node_module_fqn
from .matcher import LINEAR, is_call, shape_of, skip_transparent_back

TRANSFORMS = ("smooth", "R1", "R2", "R3", "R4")


@dataclass
class Pattern:
    """One site found in the graph.

    ``kind``: the family (``norm_linear``, ``linear_linear``, ``attention_vo``, ``attention_qk``,
    ``residual_stream`` or a registered name); ``modules``: module FQNs involved; ``applies``:
    transforms valid here; ``blocked``: transform -> reason it cannot apply; ``requires``:
    transform -> rewrites that must run first (e.g. untie embeddings); ``details``: sizes and
    roles (JSON-serialisable); ``nodes``: graph nodes for the passes (not serialised).
    """

    kind: str
    modules: list[str]
    applies: list[str] = field(default_factory=list)
    blocked: dict[str, str] = field(default_factory=dict)
    requires: dict[str, list[str]] = field(default_factory=dict)
    layer: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    nodes: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "modules": list(self.modules), "applies": list(self.applies),
                "blocked": dict(self.blocked), "requires": {k: list(v) for k, v in self.requires.items()},
                "layer": self.layer, "details": _jsonable(self.details)}

    def block(self, transform: str, reason: str) -> None:
        if transform in self.applies:
            self.applies.remove(transform)
        self.blocked.setdefault(transform, reason)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, torch.SymInt):
        return str(v)
    return str(v)


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)(?:\.|$)")


def layer_index(fqn: str) -> int | None:
    m = _LAYER_RE.search(fqn)
    return int(m.group(1)) if m else None


@dataclass
class LinearSite:
    node: fx.Node
    fqn: str
    weight: str  # get_attr target of the weight
    bias: str | None
    in_features: int
    out_features: int


class AnalysisContext:
    """What pattern families share: the captured graph, an index of its linears, and the
    patterns found so far (families run in registration order)."""

    def __init__(self, captured: CapturedGraph):
        self.captured = captured
        self.graph = captured.graph
        self.patterns: list[Pattern] = []
        self.norms: list = []  # NormSite records, filled by norm_linear
        self.linears: dict[fx.Node, LinearSite] = {}
        for n in self.graph.nodes:
            if is_call(n, LINEAR):
                site = self._linear_site(n)
                if site is not None:
                    self.linears[n] = site

    def _linear_site(self, n: fx.Node) -> LinearSite | None:
        w = skip_transparent_back(n.args[1])
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return None  # a linear on computed weights (e.g. already quantized): not a rewrite site
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        b = skip_transparent_back(b) if b is not None else None
        bias = str(b.target) if isinstance(b, fx.Node) and b.op == "get_attr" else None
        weight = self.captured.param(str(w.target))
        fqn = node_module_fqn(n) or str(w.target).rsplit(".", 1)[0]
        return LinearSite(n, fqn, str(w.target), bias, int(weight.shape[1]), int(weight.shape[0]))

    def linear(self, node: Any) -> LinearSite | None:
        return self.linears.get(node) if isinstance(node, fx.Node) else None

    def of_kind(self, kind: str) -> list[Pattern]:
        return [p for p in self.patterns if p.kind == kind]

    def dim(self, node: fx.Node, i: int = -1):
        s = shape_of(node)
        return s[i] if s else None


PatternFn = Callable[[AnalysisContext], list[Pattern]]
_REGISTRY: dict[str, PatternFn] = {}


def register_pattern(name: str, fn: PatternFn | None = None):
    """Register a pattern family: ``fn(ctx) -> list[Pattern]``. Usable as a decorator.

    Families run in registration order after the built-ins, so a user family can read
    ``ctx.patterns`` (everything found so far) and ``ctx.linears``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("register_pattern needs a non-empty name")

    def deco(f: PatternFn) -> PatternFn:
        if not callable(f):
            raise TypeError(f"pattern {name!r} must be a callable taking an AnalysisContext")
        _REGISTRY[name] = f
        return f

    return deco(fn) if fn is not None else deco


def unregister_pattern(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_patterns() -> dict[str, PatternFn]:
    return dict(_REGISTRY)
