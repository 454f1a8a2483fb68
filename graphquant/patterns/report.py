"""Run the pattern families over a captured graph and render the rotatable-patterns report."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..capture import CapturedGraph
from .attention import attention_qk, attention_vo
from .base import TRANSFORMS, AnalysisContext, Pattern, registered_patterns
from .linear_linear import linear_linear
from .norm_linear import norm_linear
from .residual_stream import residual_stream

BUILTIN_FAMILIES = (("norm_linear", norm_linear), ("linear_linear", linear_linear), ("attention_vo", attention_vo),
                    ("attention_qk", attention_qk), ("residual_stream", residual_stream))


def analyze_graph(captured: CapturedGraph) -> "PatternReport":
    ctx = AnalysisContext(captured)
    for name, fn in BUILTIN_FAMILIES + tuple(registered_patterns().items()):
        found = fn(ctx) or []
        for p in found:
            if not isinstance(p, Pattern):
                raise TypeError(f"pattern family {name!r} returned {type(p).__name__}, expected graphquant.Pattern")
        ctx.patterns.extend(found)
    _propagate_r1(ctx)
    return PatternReport(captured.model_class, ctx.patterns, context=ctx)


def _propagate_r1(ctx: AnalysisContext) -> None:
    """A norm->linear group can be rotated by R1 only if its norm reads the residual stream and the
    stream itself is rotatable."""
    streams = ctx.of_kind("residual_stream")
    stream = streams[0] if streams else None
    stream_norms = set(stream.details["norms"]) if stream else set()
    for p in ctx.of_kind("norm_linear"):
        norm = p.nodes["norm"]
        if stream is None or norm.fqn not in stream_norms:
            p.block("R1", "this norm does not read the residual stream")
        elif "R1" in stream.blocked:
            p.block("R1", "residual stream: " + stream.blocked["R1"])
        elif norm.kind == "layer_norm":
            p.requires.setdefault("R1", []).append("convert LayerNorm to RMSNorm")


@dataclass
class PatternReport:
    """What can be smoothed and rotated in a model, and why not. Returned by ``graphquant.analyze``."""

    model: str
    patterns: list[Pattern]
    context: AnalysisContext | None = field(default=None, repr=False)

    def of_kind(self, kind: str) -> list[Pattern]:
        return [p for p in self.patterns if p.kind == kind]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.patterns:
            out[p.kind] = out.get(p.kind, 0) + 1
        return out

    @property
    def residual_stream(self) -> Pattern | None:
        s = self.of_kind("residual_stream")
        return s[0] if s else None

    def to_dict(self) -> dict:
        return {"model": self.model, "patterns": [p.to_dict() for p in self.patterns]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    # --- human-readable table ------------------------------------------------------------
    def summary(self) -> str:
        lines = [f"graphquant rotatable-patterns report: {self.model}"]
        counts = self.counts()
        lines.append("found: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        rs = self.residual_stream
        if rs is not None:
            d = rs.details
            h = d["hadamard"]
            status = "applies" if "R1" in rs.applies else "BLOCKED"
            lines.append(f"R1 residual stream (hidden {d['hidden_size']}, Hadamard {_had(h)}): {status}; "
                         f"{len(d['embeddings'])} embeddings, {len(d['writers'])} writers, {len(d['norms'])} norms, "
                         f"{len(d['readers'])} readers"
                         + (f", final norm {d['final_norm']} -> {d['lm_head']}" if d.get("lm_head") else ""))
            for t, reqs in rs.requires.items():
                for r in reqs:
                    lines.append(f"  {t} needs: {r}")
            if "R1" in rs.blocked:
                lines.append(f"  R1 blocked: {rs.blocked['R1']}")
        header = ["layer", "site", *TRANSFORMS, "size", "hadamard"]
        rows = []
        order = {"norm_linear": 0, "attention_qk": 1, "attention_vo": 2, "linear_linear": 3}
        body = [p for p in self.patterns if p.kind != "residual_stream"]
        body.sort(key=lambda p: (p.layer if p.layer is not None else 1 << 30, order.get(p.kind, 9)))
        for p in body:
            size, had = _size(p)
            rows.append(["-" if p.layer is None else str(p.layer), _site(p),
                         *[_mark(p, t) for t in TRANSFORMS], size, had])
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        lines.append("")
        lines.append(fmt.format(*header))
        lines.append(fmt.format(*["-" * w for w in widths]))
        lines.extend(fmt.format(*r) for r in rows)
        lines.append("legend: yes = applies, no = blocked (reason below), . = not applicable")
        reasons = {}
        for p in body:
            for t, why in p.blocked.items():
                reasons.setdefault((t, why), []).append(_site(p) if p.layer is None else f"L{p.layer} {_site(p)}")
        if reasons:
            lines.append("")
            lines.append("blocked:")
            for (t, why), where in reasons.items():
                more = f" (+{len(where) - 3} more)" if len(where) > 3 else ""
                lines.append(f"  {t} at {', '.join(where[:3])}{more}: {why}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    # --- graphviz ------------------------------------------------------------------------------
    def to_dot(self) -> str:
        colors = {"norm_linear": "#4C72B0", "linear_linear": "#55A868", "attention_vo": "#C44E52",
                  "attention_qk": "#8172B2", "residual_stream": "#CCB974"}
        out = [f'digraph "{self.model}" {{', "  rankdir=LR;", '  node [shape=box, fontsize=10];']
        declared = set()

        def node(name, **attrs):
            if name not in declared:
                declared.add(name)
                a = ", ".join(f'{k}="{v}"' for k, v in attrs.items())
                out.append(f'  "{name}"' + (f" [{a}];" if a else ";"))

        for p in self.patterns:
            c = colors.get(p.kind, "#777777")
            label = f"{p.kind}: " + (",".join(p.applies) or "none")
            if p.kind == "residual_stream":
                node("residual stream", shape="ellipse", style="filled", fillcolor=c)
                for w in p.details["writers"]:
                    node(w)
                    out.append(f'  "{w}" -> "residual stream" [color="{c}", label="writer"];')
                for n in p.details["norms"]:
                    node(n)
                    out.append(f'  "residual stream" -> "{n}" [color="{c}", label="reader"];')
                continue
            src, dsts = p.modules[0], p.modules[1:]
            if p.kind == "linear_linear":
                src, dsts = p.modules[:-1], [p.modules[-1]]
                for s in src:
                    node(s)
                    for d in dsts:
                        node(d)
                        out.append(f'  "{s}" -> "{d}" [color="{c}", label="{label}"];')
                continue
            node(src)
            for d in dsts:
                node(d)
                out.append(f'  "{src}" -> "{d}" [color="{c}", label="{label}"];')
        out.append("}")
        return "\n".join(out)


def _had(h: dict) -> str:
    return h["factorization"] + " ok" if h and h.get("supported") else "none"


def _mark(p: Pattern, t: str) -> str:
    if t in p.applies:
        return "yes"
    if t in p.blocked:
        return "no"
    return "."


def _site(p: Pattern) -> str:
    short = lambda f: f.rsplit(".", 1)[-1] if f else "?"  # noqa: E731
    if p.kind == "norm_linear":
        return f"{short(p.modules[0])} -> {','.join(short(m) for m in p.modules[1:])}"
    if p.kind == "linear_linear":
        return f"{','.join(short(m) for m in p.modules[:-1])} -> {short(p.modules[-1])}"
    if p.kind == "attention_vo":
        return f"{short(p.details['v_proj'])} -> attn -> {short(p.details['o_proj'])}"
    if p.kind == "attention_qk":
        rope = " (RoPE)" if p.details.get("rope") else ""
        return f"q,k after {short(p.details.get('q_proj'))}/{short(p.details.get('k_proj'))}{rope}"
    return f"{p.kind}: {','.join(short(m) for m in p.modules[:3])}"


def _size(p: Pattern) -> tuple[str, str]:
    d = p.details
    if p.kind == "norm_linear":
        return str(d.get("hidden_size")), ""
    if p.kind == "linear_linear":
        return str(d["intermediate_size"]), _had(d["hadamard"])
    if p.kind in ("attention_vo", "attention_qk"):
        return f"hd {d['head_dim']}", _had(d["hadamard"])
    return "", ""
