"""Public entry points: ``analyze``, ``rewrite``, ``quantize``, ``ModelQuantizer``."""
from __future__ import annotations

import copy

from torch import nn

from .capture import capture
from .equivalence import EquivalenceGuard
from .graph_model import GraphModel
from .passes import PassContext, PassManager
from .passes.manager import registered_passes, user_passes
from .patterns.report import PatternReport, analyze_graph
from .plan import make_plan


def analyze(model: nn.Module, example_inputs=None) -> PatternReport:
    """Capture ``model`` and report what can be smoothed and rotated (R1–R4), and why not.

    The model is not modified. ``example_inputs``: a tensor, tuple, kwargs dict or (args, kwargs);
    by default ``input_ids`` of shape (2, 16) (and ``use_cache=False`` for causal LMs).
    """
    captured = capture(model, example_inputs)
    return analyze_graph(captured)


def _prepare(model: nn.Module, example_inputs, inplace: bool):
    from .errors import UnsupportedModelError

    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"graphquant works on torch.nn.Module objects, got {type(model).__name__}")
    work = model if inplace else copy.deepcopy(model)
    captured = capture(work, example_inputs)
    return captured, analyze_graph(captured)


def run_pipeline(ctx: PassContext, passes: list[str], check: bool) -> dict[str, float]:
    """Run ``passes`` (plus every registered user pass) in order; with ``check``, the equivalence
    guard verifies after each function-preserving pass that the float output is unchanged."""
    guard = EquivalenceGuard(ctx.captured) if check else None
    specs = registered_passes()

    def after_each(name, _ctx):
        if guard is not None and specs[name].offline:
            guard.check(name)

    PassManager(list(passes) + user_passes()).run(ctx, after_each=after_each)
    return guard.errors if guard else {}


def rewrite(model: nn.Module, pre_quant_opt_config, calib_data=None, example_inputs=None, inplace: bool = False,
            check: bool = True) -> GraphModel:
    """Rewrite ``model``'s weights (smoothing, norm fusion, R1/R2 rotations) and insert online
    rotations (R3/R4) as the configs ask, keeping the float function. Returns a ``GraphModel`` that
    takes the model's inputs. ``pre_quant_opt_config``: a config or list of configs
    (``SmoothQuantConfig``, ``AutoSmoothQuantConfig``, ``RotationConfig``, ``QuaRotConfig``) or their
    names. ``calib_data`` is needed for smoothing. The user's model is untouched unless ``inplace``.
    """
    captured, report = _prepare(model, example_inputs, inplace)
    plan = make_plan(report, pre_quant_opt_config)
    ctx = PassContext(captured, report, plan, calib_data=calib_data)
    errors = run_pipeline(ctx, plan.passes(), check)
    return GraphModel(captured, report, plan, ctx.log, errors)
