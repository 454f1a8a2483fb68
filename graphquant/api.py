"""Public entry points: ``analyze``, ``rewrite``, ``quantize``, ``ModelQuantizer``."""
from __future__ import annotations

import copy

from torch import nn

from .capture import capture
from .equivalence import EquivalenceGuard
from .graph_model import GraphModel, QuantizedModel
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


def _as_config(config):
    from .config import Config, preset

    if isinstance(config, str):
        return preset(config)
    if not isinstance(config, Config):
        from .errors import ConfigError

        raise ConfigError(f"config must be a graphquant.config.Config or a preset name, got {type(config).__name__}; "
                          "e.g. graphquant.config.preset('w_int8_a_int8_per_tensor_sym')")
    return config


def _materialize(calib_data):
    if calib_data is None:
        return None
    import torch

    if isinstance(calib_data, (torch.Tensor, dict)):
        return [calib_data]
    try:
        return list(calib_data)
    except TypeError:
        from .errors import CalibrationError

        raise CalibrationError(f"calibration data must be an iterable of batches, got {type(calib_data).__name__}") \
            from None


def quantize(model: nn.Module, config, calib_data=None, example_inputs=None, *, inplace: bool = False,
             check: bool = True, lower: bool = False, keep_float_weights: bool = False,
             progress: bool = True) -> QuantizedModel:
    """Quantize ``model`` as ``config`` says and return a ``QuantizedModel`` that takes the model's
    inputs and returns its outputs (logits).

    Pipeline: capture -> analyze -> plan -> pre-quantization rewrites (``config.pre_quant_opt_config``:
    smoothing, R1/R2, online R3/R4; each checked for float equivalence) -> algorithms
    (``config.algo_config``: GPTQ, AWQ, AutoSmoothQuant) -> Q/DQ insertion and calibration ->
    lowering to low-precision kernels (``lower=True``).

    ``config``: a ``graphquant.config.Config`` or a preset name. ``calib_data``: an iterable of
    ``input_ids`` tensors or dicts of model inputs (needed for static activation scales, smoothing
    and the algorithms). The user's model is not modified unless ``inplace=True``.
    ``keep_float_weights`` keeps the float weights so ``disable_quantizers()`` can compare.
    """
    config = _as_config(config)
    calib = _materialize(calib_data)
    captured, report = _prepare(model, example_inputs, inplace)
    plan = make_plan(report, list(config.pre_quant_opt_config or []) + _smoothing_in_algo_config(config),
                     exclude=list(config.exclude or []))
    ctx = PassContext(captured, report, plan, config=config, calib_data=calib)
    ctx.stats["keep_float_weights"] = keep_float_weights
    ctx.stats["progress"] = progress
    passes = plan.passes() + _algorithm_passes(config) + ["insert_qdq"] + (["lower"] if lower else [])
    errors = run_pipeline(ctx, passes, check)
    qm = QuantizedModel(captured, report, plan, ctx.log, errors, config)
    qm.lowering = ctx.stats.get("lowering", {})
    return qm


def _algo_list(config) -> list:
    algos = config.algo_config or []
    return list(algos) if isinstance(algos, (list, tuple)) else [algos]


def _smoothing_in_algo_config(config) -> list:
    """Quark also accepts SmoothQuant as an algorithm; it is the same offline rewrite."""
    return [a for a in _algo_list(config) if type(a).__name__ == "SmoothQuantConfig"]


def _algorithm_passes(config) -> list[str]:
    names = []
    for a in _algo_list(config):
        if type(a).__name__ == "SmoothQuantConfig":
            continue
        name = getattr(a, "name", type(a).__name__).lower()
        if name not in registered_passes():
            from .errors import ConfigError

            raise ConfigError(f"algorithm {name!r} is not available; available: "
                              f"{[n for n in ('gptq', 'awq', 'autosmoothquant') if n in registered_passes()]}")
        if name == "sink_tokens":  # keeps the float weights insert_qdq would drop, when asked to
            names.append("sink_tokens_keep_float")
        names.append(name)
    return names


class ModelQuantizer:
    """Quark-style entry point: ``ModelQuantizer(config).quantize_model(model, calib_dataloader)``."""

    def __init__(self, config):
        self.config = _as_config(config)

    def quantize_model(self, model: nn.Module, dataloader=None, example_inputs=None, **kwargs) -> QuantizedModel:
        return quantize(model, self.config, dataloader, example_inputs=example_inputs, **kwargs)
