"""A small declarative matcher over ATen graphs.

Patterns are data: ``Op(targets, *arg_patterns)``, ``Var(name)``, ``Const(value)``, ``ANY``.
Bookkeeping nodes (dtype casts, aliases, clones, eval-mode dropout) are transparent: the matcher
looks through them when it compares a node with a pattern, so the same pattern matches a model
whether or not it up-casts before its norm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import fx

aten = torch.ops.aten

# ops whose output equals their first input, value for value (modulo dtype)
TRANSPARENT = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.alias.default,
    aten.clone.default, aten.contiguous.default, aten.detach.default, aten.type_as.default,
    aten.lift_fresh_copy.default,
}
# ops that never produce a value anyone reads
SINKS = {aten._assert_tensor_metadata.default}
DROPOUT = {aten.dropout.default}
# shape ops that keep a tensor's elements; channel-preserving when the last dim is unchanged
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
         aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.transpose.int,
         aten.permute.default, aten.slice.Tensor, aten.flatten.using_ints}
LINEAR = aten.linear.default
SDPA = aten.scaled_dot_product_attention.default


def is_call(node: Any, targets) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if isinstance(targets, (set, frozenset, list, tuple)):
        return node.target in targets
    return node.target == targets


def is_transparent(node: Any) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in TRANSPARENT:
        return True
    if node.target in DROPOUT:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False)
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.0)
        return (not train) or p == 0.0
    return False


def skip_transparent_back(node: Any) -> Any:
    """Walk up through transparent nodes to the node that really produced the value."""
    while is_transparent(node):
        node = node.args[0]
    return node


def shape_of(node: Any) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    return None


def last_dim(node: Any):
    s = shape_of(node)
    return s[-1] if s else None


def keeps_last_dim(node: fx.Node) -> bool:
    """True for a view-like node whose output last dim holds the same channels as its input's."""
    if not is_call(node, VIEWS):
        return False
    src = node.args[0]
    si, so = shape_of(src), shape_of(node)
    if si is None or so is None or not si or not so:
        return False
    nd = len(si)
    t = node.target
    if t == aten.transpose.int:
        dims = {d % nd for d in node.args[1:3]}
        return (nd - 1) not in dims
    if t == aten.permute.default:
        perm = [d % nd for d in node.args[1]]
        return perm[-1] == nd - 1
    if t == aten.slice.Tensor:
        dim = node.args[1] % nd if len(node.args) > 1 else 0
        return dim != nd - 1 or _full_slice(node)
    if t == aten.unsqueeze.default:
        return node.args[1] % (nd + 1) != nd
    return _same(si[-1], so[-1])


def _full_slice(node: fx.Node) -> bool:
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    size = shape_of(node.args[0])[-1]
    return start in (0, None) and (end is None or (isinstance(end, int) and end >= _as_int(size, end))) and step == 1


def _as_int(v, default):
    try:
        return int(v)
    except Exception:  # symbolic
        return default


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return str(a) == str(b)


def users_through_transparent(node: fx.Node, through_views: bool = False) -> list[fx.Node]:
    """Real consumers of ``node``: transparent (and optionally channel-preserving view) nodes are
    looked through; sink nodes (metadata asserts) are dropped."""
    out: list[fx.Node] = []
    seen = set()
    stack = [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if is_call(u, SINKS):
                continue
            if (is_transparent(u) and u.args[0] is n) or (through_views and keeps_last_dim(u) and u.args[0] is n):
                stack.append(u)
            else:
                out.append(u)
    return out


def producer_through_views(node: Any) -> Any:
    """Walk up through transparent nodes and channel-preserving views."""
    while isinstance(node, fx.Node) and (is_transparent(node) or keeps_last_dim(node)):
        node = node.args[0]
    return node


# --- declarative patterns -----------------------------------------------------------------
class Pat:
    def match(self, node: Any, b: dict) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Var(Pat):
    """Binds any value to a name; a second occurrence must bind the same value."""

    name: str
    where: Callable[[Any], bool] | None = None

    def match(self, node, b):
        node = skip_transparent_back(node)
        if self.where is not None and not self.where(node):
            return False
        if self.name in b:
            return b[self.name] is node or (not isinstance(node, fx.Node) and b[self.name] == node)
        b[self.name] = node
        return True


@dataclass
class Const(Pat):
    """A Python constant, or a predicate on it."""

    value: Any

    def match(self, node, b):
        if isinstance(node, fx.Node):
            return False
        if callable(self.value):
            return bool(self.value(node))
        return node == self.value


class _Any(Pat):
    def match(self, node, b):
        return True


ANY = _Any()


class Op(Pat):
    """Matches a ``call_function`` node with one of ``targets``; ``commutative`` tries both
    orders of the first two arguments. Extra node arguments beyond the patterns are ignored."""

    def __init__(self, targets, *args: Pat | Any, name: str | None = None, commutative: bool = False):
        self.targets = set(targets) if isinstance(targets, (set, list, tuple, frozenset)) else {targets}
        self.args = [a if isinstance(a, Pat) else Const(a) for a in args]
        self.name = name
        self.commutative = commutative

    def match(self, node, b):
        node = skip_transparent_back(node)
        if not is_call(node, self.targets):
            return False
        orders = [list(node.args)]
        if self.commutative and len(node.args) >= 2:
            orders.append([node.args[1], node.args[0], *node.args[2:]])
        for args in orders:
            if len(args) < len(self.args):
                continue
            trial = dict(b)
            if all(p.match(a, trial) for p, a in zip(self.args, args)):
                if self.name:
                    trial[self.name] = node
                b.clear()
                b.update(trial)
                return True
        return False


def match(pattern: Pat, node: fx.Node) -> dict | None:
    """Match ``pattern`` rooted at ``node``; returns the bindings or None."""
    b: dict = {}
    return b if pattern.match(node, b) else None


def find_all(pattern: Pat, nodes: Iterable[fx.Node]) -> list[dict]:
    out = []
    for n in nodes:
        b = match(pattern, n)
        if b is not None:
            out.append(b)
    return out
