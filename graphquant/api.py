"""Public entry points: ``analyze``, ``rewrite``, ``quantize``, ``ModelQuantizer``."""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from .capture import capture
from .equivalence import EquivalenceGuard
from .errors import EquivalenceError, GraphQuantError, NonFiniteError, UnsupportedModelError
from .graph_model import GraphModel, QuantizedModel
from .log import logger, set_severity
from .passes import PassContext, PassManager
from .passes.manager import QUANTIZING_STAGES, registered_passes, user_passes
from .patterns.report import PatternReport, analyze_graph
from .plan import make_plan


def analyze(model: nn.Module, example_inputs=None) -> PatternReport:
    """Capture ``model`` and report what can be smoothed and rotated (R1–R4), and why not.

    The model is not modified. ``example_inputs``: a tensor, tuple, kwargs dict or (args, kwargs);
    by default ``input_ids`` of shape (2, 16) (and ``use_cache=False`` for causal LMs).
    """
    _check_model(model)
    captured = capture(model, example_inputs)
    return analyze_graph(captured)


def _check_model(model) -> None:
    if isinstance(model, GraphModel):
        raise UnsupportedModelError(
            f"this is already a graphquant {type(model).__name__} (returned by rewrite/quantize); pass the original "
            "float model instead and put the rewrites in the config, e.g. quantize(model, dataclasses.replace(cfg, "
            "pre_quant_opt_config=[QuaRotConfig()]))")
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"graphquant works on torch.nn.Module objects, got {type(model).__name__}")


def _prepare(model: nn.Module, example_inputs, inplace: bool, calib=None):
    from .capture import example_inputs_for

    _check_model(model)
    work = model if inplace else copy.deepcopy(model)
    t0 = time.perf_counter()
    logger.info("capturing %s with torch.export ...", type(model).__name__)
    captured = capture(work, example_inputs if example_inputs is not None else example_inputs_for(work, calib))
    check_finite_weights(captured)
    report = analyze_graph(captured)
    logger.info("captured and analysed in %.1fs: %d patterns", time.perf_counter() - t0, len(report.patterns))
    return captured, report


def check_finite_weights(captured) -> None:
    """Raise ``NonFiniteError`` when a floating-point parameter or buffer holds NaN or Inf."""
    bad = []
    for target, t in list(captured.gm.named_parameters()) + list(captured.gm.named_buffers()):
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            bad.append(f"{captured.state_dict_names(target)[0]} ({n_nan} NaN, {n_inf} Inf)")
    if bad:
        raise NonFiniteError(f"the model has non-finite weights in {len(bad)} tensor(s): {', '.join(bad[:3])}"
                             f"{' ...' if len(bad) > 3 else ''}; the checkpoint is damaged or the model diverged — "
                             "reload or re-download it")


def _check_finite_output(captured, what: str) -> None:
    from .equivalence import model_output

    with torch.no_grad():
        out = model_output(captured(*captured.example_args, **captured.example_kwargs))
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(f"the {what} model's output is not finite (NaN/Inf) on the probe batch; check the "
                             "weights, the calibration data and the model's dtype (float16 overflows: try bfloat16 "
                             "or float32)")


def run_pipeline(ctx: PassContext, passes: list[str], check: bool, user=None) -> dict[str, float]:
    """Run ``passes`` plus the user passes (every registered one, or those in ``user``) in order.

    With ``check``, the equivalence guard verifies the float output after every pass that must keep
    the float function: built-in offline rewrites, and user passes that run before quantization
    starts unless registered with ``check=False`` (see ``graphquant.passes.manager``)."""
    specs = registered_passes()
    manager = PassManager(list(passes) + user_passes(user))
    guard = EquivalenceGuard(ctx.captured) if check else None
    quantizing = False
    last = [time.perf_counter()]

    def after_each(name, _ctx):
        nonlocal quantizing
        spec = specs[name]
        quantizing = quantizing or spec.stage in QUANTIZING_STAGES
        logger.info("pass %s: %.1fs", name, time.perf_counter() - last[0])
        last[0] = time.perf_counter()
        if guard is None or (spec.check is None and quantizing):
            return
        if spec.check is False:
            if not quantizing:
                guard.rebase()  # the function changed on purpose: later passes must keep the new one
            return
        if quantizing:
            raise EquivalenceError(f"pass {name!r} was registered with check=True but runs after quantization "
                                   "started, where the float function is gone; order it before 'algorithms' or "
                                   "register it with check=False")
        try:
            err = guard.check(name)
        except EquivalenceError as e:
            if spec.builtin:
                raise
            raise EquivalenceError(f"{e}. If {name!r} changes the function on purpose, register it with "
                                   f"register_pass({name!r}, ..., check=False)") from None
        logger.info("%s: float output unchanged (relative error %.2g)", name, err)
        last[0] = time.perf_counter()

    if manager.order:
        logger.info("running passes: %s", ", ".join(manager.order))
    manager.run(ctx, after_each=after_each)
    return guard.errors if guard else {}


def _inplace_guard(model: nn.Module, inplace: bool):
    """For ``inplace=True``: a CPU copy of the model's tensors, restored if the pipeline fails."""
    if not inplace:
        return None
    return {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict(keep_vars=True).items()}


def _restore(model: nn.Module, saved: dict) -> None:
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name in saved and t.shape == saved[name].shape:
                t.copy_(saved[name].to(t.device))


def _eager_output(model: nn.Module, captured):
    from .equivalence import model_output

    kwargs = {**captured.constant_kwargs, **captured.example_kwargs}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model_output(model(*captured.example_args, **kwargs)).detach().clone()
    finally:
        model.train(was_training)


def _finish_inplace(model: nn.Module, captured, reference, result_name: str) -> None:
    """After an in-place run: if the user's eager model no longer computes its function (online
    rotations and quantizers live only in the graph), make calling it an error instead of a silent
    wrong answer."""
    from .equivalence import TOLERANCE, relative_norm_error

    err = relative_norm_error(reference, _eager_output(model, captured))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if err <= TOLERANCE.get(dtype, 1e-3):
        return

    def refuse(_module, _args, _kwargs=None):
        raise GraphQuantError(
            f"this model was rewritten in place by graphquant.{result_name}(..., inplace=True) and no longer "
            f"computes its own function (online rotations and quantizers live in the returned model; relative "
            f"error {err:.2g}); call the returned model, or use inplace=False to keep this one intact")

    model.register_forward_pre_hook(refuse, with_kwargs=True)
    logger.info("inplace=True: the original model object now refuses to run; use the returned model")


def _run_guarded(model, inplace: bool, example_inputs, calib, build_ctx, passes_of, check, user, result_name):
    saved = _inplace_guard(model, inplace)
    reference = None
    try:
        captured, report = _prepare(model, example_inputs, inplace, calib)
        if inplace:
            reference = _eager_output(model, captured)
        ctx = build_ctx(captured, report)
        errors = run_pipeline(ctx, passes_of(ctx), check, user)
        _check_finite_output(captured, "rewritten" if result_name == "rewrite" else "quantized")
    except BaseException:
        if saved is not None:
            _restore(model, saved)
            logger.info("inplace=True: the run failed; the model's original weights were restored")
        raise
    if inplace:
        _finish_inplace(model, captured, reference, result_name)
    return captured, report, ctx, errors


def rewrite(model: nn.Module, pre_quant_opt_config, calib_data=None, example_inputs=None, inplace: bool = False,
            check: bool = True, passes=None) -> GraphModel:
    """Rewrite ``model``'s weights (smoothing, norm fusion, R1/R2 rotations) and insert online
    rotations (R3/R4) as the configs ask, keeping the float function. Returns a ``GraphModel`` that
    takes the model's inputs. ``pre_quant_opt_config``: a config or list of configs
    (``SmoothQuantConfig``, ``AutoSmoothQuantConfig``, ``RotationConfig``, ``QuaRotConfig``) or their
    names. ``calib_data`` is needed for smoothing.

    ``passes``: the user passes to run (names or ``@register_pass`` functions); ``None`` runs every
    registered user pass. ``check``: verify after every function-preserving pass that the float output
    is unchanged. ``inplace``: see :func:`quantize`.
    """
    calib = _materialize(calib_data)

    def build(captured, report):
        plan = make_plan(report, pre_quant_opt_config)
        return PassContext(captured, report, plan, calib_data=calib)

    captured, report, ctx, errors = _run_guarded(model, inplace, example_inputs, calib, build,
                                                 lambda ctx: ctx.plan.passes(), check, passes, "rewrite")
    return GraphModel(captured, report, ctx.plan, ctx.log, errors)


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
             progress: bool = True, passes=None) -> QuantizedModel:
    """Quantize ``model`` as ``config`` says and return a ``QuantizedModel`` that takes the model's
    inputs and returns its outputs (logits).

    Pipeline: capture -> analyze -> plan -> pre-quantization rewrites (``config.pre_quant_opt_config``:
    smoothing, R1/R2, online R3/R4; each checked for float equivalence) -> algorithms
    (``config.algo_config``: GPTQ, AWQ, AutoSmoothQuant) -> Q/DQ insertion and calibration ->
    lowering to low-precision kernels (``lower=True``: on CUDA every kernel; on CPU only where a kernel
    measures faster than fake-quant, never fp8 — the timings and reasons are in
    ``QuantizedModel.lowering``; ``lower="all"`` lowers wherever a kernel exists).

    ``config``: a ``graphquant.config.Config`` or a preset name. ``calib_data``: an iterable (a list or
    a ``DataLoader``) of ``input_ids`` tensors or dicts of model inputs, e.g. padded
    ``{"input_ids", "attention_mask"}`` batches (padding tokens are left out of the activation
    statistics). Needed for static activation scales, smoothing and the algorithms.
    ``passes``: the user passes to run (see :func:`rewrite`). ``keep_float_weights`` keeps the float
    weights so ``disable_quantizers()`` can compare. Non-finite weights or outputs raise
    ``NonFiniteError``.

    ``inplace``: ``False`` (default) works on a copy; the user's model is untouched. ``True`` works on
    the model itself (no second copy is left afterwards): if anything fails, the model's original
    weights are restored; on success, if the model object no longer computes its own function
    (online rotations, ...), calling it raises an error that points to the returned model.
    """
    config = _as_config(config)
    if lower not in (False, True, "auto", "all"):
        from .errors import ConfigError

        raise ConfigError(f"lower must be False, True (= 'auto') or 'all', got {lower!r}")
    set_severity(config.log_severity_level)
    calib = _materialize(calib_data)

    def build(captured, report):
        plan = make_plan(report, list(config.pre_quant_opt_config or []) + _smoothing_in_algo_config(config),
                         exclude=list(config.exclude or []))
        ctx = PassContext(captured, report, plan, config=config, calib_data=calib)
        ctx.stats["keep_float_weights"] = keep_float_weights
        ctx.stats["progress"] = progress
        ctx.stats["lower_policy"] = "auto" if lower is True else lower
        return ctx

    def passes_of(ctx):
        return ctx.plan.passes() + _algorithm_passes(config) + ["insert_qdq"] + (["lower"] if lower else [])

    t0 = time.perf_counter()
    captured, report, ctx, errors = _run_guarded(model, inplace, example_inputs, calib, build, passes_of, check,
                                                 passes, "quantize")
    qm = QuantizedModel(captured, report, ctx.plan, ctx.log, errors, config)
    qm.lowering = ctx.stats.get("lowering", {})
    logger.info("quantized in %.1fs", time.perf_counter() - t0)
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
    """Quark-style entry point: ``ModelQuantizer(config).quantize_model(model, calib_dataloader)``.

    The dataloader may yield ``input_ids`` tensors or dicts such as Quark's padded
    ``{"input_ids", "attention_mask"}`` batches."""

    def __init__(self, config):
        self.config = _as_config(config)

    def quantize_model(self, model: nn.Module, dataloader=None, example_inputs=None, **kwargs) -> QuantizedModel:
        return quantize(model, self.config, dataloader, example_inputs=example_inputs, **kwargs)
