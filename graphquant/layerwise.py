"""The layer-by-layer runner: the captured graph cut into decoder layers ("blocks") and run one
block at a time over the calibration batches, from a cache of the values live at the block's start.

Used by the algorithms (GPTQ, AWQ, AutoSmoothQuant) for their per-layer statistics, and by the
streamed pipeline (:mod:`graphquant.stream`), which also uses the blocks to decide which weights
must be resident together.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import fx

from .calibrate import _TOKEN_MASK, _token_mask, normalize_batch, probes, valid_tokens
from .capture import node_module_fqn
from .errors import CalibrationError, PassError
from .patterns.base import LinearSite

__all__ = ["LayerwiseRunner", "Block", "block_key", "make_blocks"]


class _StopForward(Exception):
    """Raised by a probe to end a forward pass once every value it needs has been seen."""


_NUMERIC = re.compile(r"^\d+$")


def block_key(fqn: str) -> str:
    """The repeated block a module belongs to: its FQN up to the first numeric component
    (``model.layers.3.mlp.up_proj`` → ``model.layers.3``); a module outside a numbered
    container (``lm_head``) is its own block."""
    parts = fqn.split(".")
    for i, p in enumerate(parts):
        if _NUMERIC.match(p):
            return ".".join(parts[:i + 1])
    return fqn


@dataclass
class Block:
    """A contiguous stretch of the graph holding some Linears: from ``start`` (the first node of
    the block's modules or the first input of its Linears) to just before the next block."""

    key: str
    linears: list  # LinearSite, graph order
    start: fx.Node
    end: fx.Node  # the block's last Linear

    def __repr__(self) -> str:
        return f"Block({self.key!r}, {len(self.linears)} linears)"


def make_blocks(gm: fx.GraphModule, linears: list[LinearSite], together: list[list[LinearSite]] = ()) -> list[Block]:
    """Blocks by ``block_key``, in graph order; blocks whose stretches of the graph overlap
    are merged, and so are blocks holding Linears listed ``together`` (e.g. a smoothing
    site's producer and consumers, which must change within one block)."""
    if not linears:
        return []
    idx = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups: dict[str, list[LinearSite]] = {}
    for lin in sorted(linears, key=lambda s: idx[s.node]):
        groups.setdefault(block_key(lin.fqn), []).append(lin)
    first: dict[str, int] = {}
    for n, i in idx.items():
        if n.op != "call_function":
            continue
        fqn = node_module_fqn(n)
        if not fqn:
            continue
        k = block_key(fqn)
        if k in groups and k not in first:
            first[k] = i
    spans = []
    for k, lins in groups.items():
        starts = [first.get(k, idx[lins[0].node])]
        starts += [idx[x] for x in (lin.node.args[0] for lin in lins)
                   if isinstance(x, fx.Node) and x.op == "call_function"]  # inputs/params stay cached values
        spans.append([min(starts), max(idx[lin.node] for lin in lins), k, lins])
    for group in together:  # a span over the group's Linears merges every block it touches
        at = [idx[lin.node] for lin in group if lin.node in idx]
        if len(at) > 1:
            spans.append([min(at), max(at), "", []])
    spans.sort(key=lambda s: (s[0], -s[1]))
    merged = [spans[0]]
    for s in spans[1:]:
        cur = merged[-1]
        if s[0] <= cur[1]:  # interleaved or tied: one block
            cur[1] = max(cur[1], s[1])
            cur[2] = "+".join(k for k in (cur[2], s[2]) if k)
            cur[3] = sorted(cur[3] + s[3], key=lambda lin: idx[lin.node])
        else:
            merged.append(s)
    merged = [m for m in merged if m[3]]
    nodes = list(gm.graph.nodes)
    return [Block(k, lins, nodes[a], nodes[b]) for a, b, k, lins in merged]


class LayerwiseRunner:
    """Runs the captured graph one block (decoder layer) at a time over the calibration batches.

    ``start()`` runs the graph once per batch up to the first block — with probes on the values
    still needed later and a private exception that ends the forward there — and caches them.
    ``run(block, taps, recorder)`` runs the block's part of the graph (a sub-``GraphModule``
    cut out of the captured graph, built on demand so it reads the *current* weights) from
    that cache, calling ``recorder(key, value)`` at each tapped node and stopping after the
    last one. ``advance(block)`` runs the whole block and replaces the cache with the values
    live at the next block's start. Memory: the values live at one cut (the residual stream,
    position embeddings, masks) for every batch, plus one batch's activations inside a block.
    Time: each node runs a small constant number of times, so it is linear in the number of
    layers.
    """

    def __init__(self, captured, calib_data, linears: Iterable[LinearSite], progress: bool = False,
                 desc: str = "layer-wise calibration", together: Iterable[Iterable[LinearSite]] = ()):
        if calib_data is None:
            raise CalibrationError(f"{desc} needs calibration data: pass calib_data (an iterable of input_ids "
                                   "tensors or dicts of model inputs)")
        if isinstance(calib_data, (torch.Tensor, dict)):
            calib_data = [calib_data]
        self.captured = captured
        self.gm = captured.gm
        self.batches = list(calib_data)
        if not self.batches:
            raise CalibrationError(f"{desc}: calibration data is empty; pass at least one batch")
        self.desc = desc
        self.progress = progress
        self.blocks = self._make_blocks(list(linears), [list(t) for t in together])
        self.cache: list[dict] | None = None

    # ------------------------------------------------------------------ structure
    def _index(self) -> dict:
        return {n: i for i, n in enumerate(self.gm.graph.nodes)}

    def _make_blocks(self, linears: list[LinearSite], together: list[list[LinearSite]]) -> list[Block]:
        return make_blocks(self.gm, linears, together)

    def _live_at(self, cut: fx.Node, candidates, idx) -> list[fx.Node]:
        """Values (not parameters) defined before ``cut`` and read at or after it."""
        c = idx[cut]
        return [m for m in candidates
                if m.op not in ("get_attr", "output") and idx[m] < c and any(idx[u] >= c for u in m.users)]

    # ------------------------------------------------------------------ running
    def start(self) -> None:
        """Cache, per batch, the values live at the first block's start."""
        if not self.blocks:
            self.cache = []
            return
        idx = self._index()
        live = self._live_at(self.blocks[0].start, list(self.gm.graph.nodes), idx)
        keys = {str(i): m for i, m in enumerate(live)}
        got: dict[str, object] = {}

        def record(key, value):
            got[key] = value
            if len(got) == len(keys):
                raise _StopForward

        cache = []
        self.masks = []  # per batch: the non-padding tokens (None: all), for the recorders of run()
        with torch.no_grad(), probes(self.gm, keys, record):
            for batch in self.batches:
                got.clear()
                args, kw = normalize_batch(batch, self.captured)
                self.masks.append(_token_mask(kw))
                if not keys:
                    cache.append({})
                    continue
                try:
                    self.captured(*args, **kw)
                except _StopForward:
                    pass
                if len(got) != len(keys):
                    raise PassError(f"{self.desc}: the forward pass ended before reaching "
                                    f"{self.blocks[0].key} (got {len(got)} of {len(keys)} values)")
                cache.append({keys[k]: v for k, v in got.items()})
        self.cache = cache

    def _segment(self, first: fx.Node, last: fx.Node | None, stop_before: fx.Node | None, outputs_at=None):
        """(GraphModule, inputs, outputs) computing the nodes from ``first`` to ``last``
        (inclusive) or to just before ``stop_before``; ``outputs_at``: the cut whose live values
        the module returns (else it returns nothing)."""
        idx = self._index()
        lo = idx[first]
        hi = idx[last] if last is not None else (idx[stop_before] - 1 if stop_before is not None else len(idx) - 1)
        nodes = [n for n, i in idx.items() if lo <= i <= hi and n.op not in ("get_attr", "placeholder", "output")]
        inside = set(nodes)
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        inputs: list[fx.Node] = []
        cached = self.cache[0].keys() if self.cache else set()
        for n in nodes:
            for m in n.all_input_nodes:
                if m in inside or m in env:
                    continue
                if m.op == "get_attr":
                    env[m] = g.get_attr(m.target)
                elif m in cached:
                    env[m] = g.placeholder(f"live_{len(inputs)}")
                    inputs.append(m)
                else:
                    raise PassError(f"{self.desc}: {n.name} reads {m.name}, which is neither in the block nor "
                                    "cached at its start (graph changed during calibration?)")
        # placeholders first, then the copied nodes
        for n in nodes:
            env[n] = g.node_copy(n, lambda m: env[m])
        outputs: list[fx.Node] = []
        if outputs_at is not None:
            outputs = [m for m in self._live_at(outputs_at, nodes, idx)]
        g.output(tuple(env[m] for m in outputs))
        return fx.GraphModule(self.gm, g), inputs, outputs, {n: env[n] for n in nodes}

    def run(self, block: Block, taps: dict[str, fx.Node], recorder: Callable[[str, torch.Tensor], None]) -> None:
        """Run ``block`` over every batch (from the cache) up to its last tapped node, calling
        ``recorder(key, value)`` with the value of each tapped node."""
        if self.cache is None:
            self.start()
        idx = self._index()
        inside = {k: n for k, n in taps.items() if idx[n] >= idx[block.start]}
        before = {k: n for k, n in taps.items() if k not in inside}
        for k, n in before.items():
            if self.cache and n not in self.cache[0]:
                raise PassError(f"{self.desc}: tapped node {n.name} lies before {block.key} and is not cached")
        seg = None
        if inside:
            last = max(inside.values(), key=lambda n: idx[n])
            seg, inputs, _, env = self._segment(block.start, last, None)
            seg_taps = {k: env[n] for k, n in inside.items()}
        user_recorder = recorder

        def recorder(k, v):  # padding tokens stay out of the statistics
            v = valid_tokens(v)
            if v.numel():
                user_recorder(k, v)

        masks = getattr(self, "masks", None) or [None] * len(self.cache)
        try:
            with torch.no_grad(), (probes(seg, seg_taps, recorder) if seg is not None else _nullcontext()):
                for values, mask in zip(self.cache, masks):
                    _TOKEN_MASK[0] = mask
                    for k, n in before.items():
                        recorder(k, values[n])
                    if seg is not None:
                        seg(*[values[m] for m in inputs])
        finally:
            _TOKEN_MASK[0] = None

    def advance(self, block: Block) -> None:
        """Run all of ``block`` and cache the values live at the next block's start."""
        i = self.blocks.index(block)
        if i + 1 >= len(self.blocks):
            self.cache = None
            return
        nxt = self.blocks[i + 1].start
        seg, inputs, outputs, _ = self._segment(block.start, None, nxt, outputs_at=nxt)
        idx = self._index()
        new_cache = []
        with torch.no_grad():
            for values in self.cache:
                out = seg(*[values[m] for m in inputs])
                new = {m: v for m, v in values.items()
                       if any(idx[u] >= idx[nxt] for u in m.users)}  # passed through unchanged
                new.update(zip(outputs, out))
                new_cache.append(new)
        self.cache = new_cache

    def iterate(self) -> Iterator[Block]:
        """Yield the blocks in order; after each, the runner advances to the next one."""
        bar = _progress(self.desc, len(self.blocks), self.progress)
        try:
            if self.cache is None:
                self.start()
            for block in list(self.blocks):
                yield block
                self.advance(block)
                bar.update(1)
        finally:
            bar.close()


def _progress(desc: str, total: int, enabled: bool):
    from .calibrate import progress_bar

    return progress_bar(desc, enabled, total=total, unit="layer")


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
