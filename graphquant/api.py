"""Public entry points: ``analyze``, ``rewrite``, ``quantize``, ``ModelQuantizer``."""
from __future__ import annotations

from torch import nn

from .capture import capture
from .patterns.report import PatternReport, analyze_graph


def analyze(model: nn.Module, example_inputs=None) -> PatternReport:
    """Capture ``model`` and report what can be smoothed and rotated (R1–R4), and why not.

    The model is not modified. ``example_inputs``: a tensor, tuple, kwargs dict or (args, kwargs);
    by default ``input_ids`` of shape (2, 16) (and ``use_cache=False`` for causal LMs).
    """
    captured = capture(model, example_inputs)
    return analyze_graph(captured)
