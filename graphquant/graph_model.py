"""``GraphModel``: a captured (and rewritten) graph as an ``nn.Module`` with the model's call signature."""
from __future__ import annotations

from torch import nn


class GraphModel(nn.Module):
    """Calls the rewritten graph like the original model (same inputs, same output structure).

    Attributes: ``report`` (the pattern report), ``plan``, ``log`` (what every pass changed),
    ``equivalence`` (pass -> relative output error measured by the guard).
    """

    def __init__(self, captured, report=None, plan=None, log=None, equivalence=None):
        super().__init__()
        self.gm = captured.gm
        self.captured = captured
        self.report = report
        self.plan = plan
        self.log = list(log or [])
        self.equivalence = dict(equivalence or {})
        self.config = getattr(captured, "config", None)

    def forward(self, *args, **kwargs):
        return self.captured(*args, **kwargs)

    def log_summary(self) -> str:
        lines = []
        for e in self.log:
            rest = {k: v for k, v in e.items() if k != "pass"}
            lines.append(f"[{e.get('pass')}] " + ", ".join(f"{k}={v}" for k, v in rest.items()))
        return "\n".join(lines)
