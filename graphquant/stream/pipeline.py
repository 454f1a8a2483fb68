"""``quantize_streamed``: the quantization pipeline run one decoder layer at a time, for models larger
than memory.

1. The model's structure is built on the meta device (:func:`.checkpoint.meta_model`), captured and
   analysed with fake tensors; report and plan need no weights.
2. The graph is cut into units (:mod:`.units`: the embedding, one unit per decoder layer, the last
   layer with the final norm and ``lm_head``). For each unit in order, its weights are read from the
   safetensors shards (:class:`.checkpoint.CheckpointWeights`), the plan's offline and online rewrites
   of the unit's sites run (norm fusion, R1 with the same Q for every layer, R2, R4, R3), then GPTQ
   of its Linears on the calibration activations carried from the previous unit
   (:class:`graphquant.layerwise.LayerwiseRunner`), then Q/DQ insertion (static activation scales from
   a second carried cache, as the in-memory pipeline calibrates after every weight is quantized); the
   unit's tensors are written to the output checkpoint and its weights are freed (back to "meta").
3. The passes are the in-memory pipeline's, run on the unit's sites only, so the checkpoint equals
   the one ``quantize()`` + ``save_pretrained()`` writes from the same checkpoint, calibration data
   and seeds, tensor for tensor (the shard boundaries differ: tensors are written in layer order).

Resident at any time: one unit's weights and their working copies (GPTQ works in float64), the
carried calibration activations (the values live between two layers, for every calibration batch),
the pending shard and the RoPE tables. ``max_memory`` (accelerate's convention) is checked against
an estimate of that before any weight is read, and the pending shard is kept within it.

Not streamed (a clear error says so): SmoothQuant / AWQ / AutoSmoothQuant (their statistics need the
float model's activations), LayerNorm models needing mean-centering (OPT), tied embeddings, lowering,
user-registered passes. The float-equivalence guard of ``quantize(check=True)`` needs the whole model
and is not run.
"""
from __future__ import annotations

import copy
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..memory import format_bytes, parse_max_memory, peak_rss_bytes, reset_peak_rss, rss_bytes

UNSUPPORTED_ALGOS = {"awq": "AWQ", "autosmoothquant": "AutoSmoothQuant"}


@dataclass
class UnitTiming:
    name: str
    seconds: float
    weight_bytes: int
    rss_bytes: int
    cuda_peak_bytes: int | None = None


@dataclass
class StreamResult:
    """What ``quantize_streamed`` did: the output folder, the export summary written to
    ``graphquant_export.json``, per-unit timings, the estimate it checked and the memory it measured."""

    output_dir: Path
    export: dict
    units: list[UnitTiming] = field(default_factory=list)
    seconds: float = 0.0
    estimate: dict = field(default_factory=dict)
    peak_rss_growth: int = 0
    cuda_peak_bytes: int | None = None
    log: list = field(default_factory=list)
    report: object = None
    plan: object = None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _compute_device(device, budget: dict[str, int]) -> torch.device:
    if device is not None:
        return torch.device(device)
    if any(k.startswith("cuda") for k in budget) and torch.cuda.is_available():
        return torch.device(next(k for k in budget if k.startswith("cuda")))
    return torch.device("cpu")


def _check_supported(config, plan) -> None:
    from ..api import _algo_list
    from ..passes.manager import user_passes

    if plan.smooth is not None:
        raise ConfigError("streamed quantization does not support SmoothQuant yet (its statistics come from the float "
                          "model's activations); use graphquant.quantize() on the loaded model, or QuaRot")
    for a in _algo_list(config):
        name = getattr(a, "name", type(a).__name__).lower()
        if name in UNSUPPORTED_ALGOS:
            raise ConfigError(f"streamed quantization supports GPTQ; {UNSUPPORTED_ALGOS[name]} needs the in-memory "
                              "pipeline: use graphquant.quantize() on the loaded model")
    if plan.convert_layernorm:
        raise ConfigError("streamed quantization does not support R1 on LayerNorm models (mean-centering touches every "
                          "layer's writers at once); use graphquant.quantize() on the loaded model")
    if user_passes():
        raise ConfigError(f"streamed quantization runs the built-in passes only; unregister {user_passes()} or use "
                          "graphquant.quantize()")


def _unit_bytes(captured, unit) -> tuple[int, int]:
    """(weights, offline work) of a unit: its weights, plus the float64 copies a rewrite makes of its
    largest tensor (read and result)."""
    ts = [captured.param(t) for t in unit.targets]
    return sum(_nbytes(t) for t in ts), 2 * 8 * max((t.numel() for t in ts), default=0)


def _estimate(captured, units, calib, gptq_targets: list, quantized: list, caches: int, shard_bytes: int,
              rewrites_here: bool = True) -> dict:
    """Bytes resident at the peak, before anything is read (see the module docstring): the largest
    unit's weights with the float64 working copies of a rewrite or of GPTQ (the largest stacked weight
    three times, the largest Hessian four times; the float32 temporaries of weight quantization, four
    copies of the largest quantized weight), the carried activations (the residual stream of
    every calibration token, twice: input and output of a layer, per cache) and the pending shard.
    ``rewrites_here=False``: the rewrites may run on the CPU instead (a GPU budget), not counted."""
    per_unit = {u.name: _unit_bytes(captured, u) for u in units}
    work = 16 * max((lin.in_features * lin.out_features for lin in quantized), default=0)
    if gptq_targets:
        max_in = max(lin.in_features for lin in gptq_targets)
        by_input: dict = {}
        for lin in gptq_targets:
            by_input.setdefault(lin.node.args[0], []).append(lin)
        max_w = max(sum(lin.out_features for lin in group) * group[0].in_features for group in by_input.values())
        work = max(work, 3 * 8 * max_w + 4 * 8 * max_in * max_in)
    if not rewrites_here:
        per_unit = {k: (w, 0) for k, (w, _) in per_unit.items()}
    biggest = max(per_unit, key=lambda k: per_unit[k][0] + max(per_unit[k][1], work))
    hidden = int(getattr(captured.config, "hidden_size", 0) or 0)
    size = captured.param(units[-1].targets[0]).element_size() if units[-1].targets else 4
    tokens = 0
    for b in calib or []:
        ids = b.get("input_ids") if isinstance(b, dict) else b
        if isinstance(ids, torch.Tensor):
            tokens += ids.numel()
    cache = 2 * tokens * hidden * size * caches
    weights, offline = per_unit[biggest]
    return {"largest_unit": biggest, "unit_weights": weights, "rewrite_work": offline, "algorithm_work": work,
            "activation_cache": cache, "pending_shard": shard_bytes,
            "total": weights + max(offline, work) + cache + shard_bytes}


def _return_freed_memory_to_os(threshold: int = 1 << 20) -> bool:
    """glibc raises its mmap threshold each time a large block is freed, so later float64 temporaries
    come from the heap, whose freed pages stay resident: a layer's high-water mark would stay with the
    process. A fixed threshold keeps blocks above it mmapped, returned when freed. Process-wide;
    set only when a CPU budget is given. Returns whether it was set."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _release_memory() -> None:
    """Collect cycles (graph segments) and give freed heap pages back to the OS (glibc), so the
    process does not keep every layer's high-water mark."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def quantize_streamed(model_dir, config, calib_data=None, output_dir=None, *, max_memory=None,
                      dtype: torch.dtype = torch.float32, device=None, format: str = "compressed-tensors",
                      max_shard_size="5GB", overwrite: bool = False, example_inputs=None, progress: bool = True,
                      trust_remote_code: bool = False, tokenizer=None) -> StreamResult:
    """Quantize the checkpoint folder ``model_dir`` layer by layer and write the quantized checkpoint to
    ``output_dir`` (see the module docstring). ``config``, ``calib_data``: as for ``graphquant.quantize``.
    ``max_memory``: accelerate's budget (``"cuda=8GiB,cpu=16GiB"`` or ``{0: "8GiB", "cpu": "16GiB"}``);
    the compute device is the first CUDA device named there when one is available (else ``device``,
    default CPU). ``dtype``: the compute dtype of the float weights (as ``load_model``'s). Returns a
    :class:`StreamResult`.
    """
    from ..api import _algorithm_passes, _as_config, _materialize, _smoothing_in_algo_config
    from ..capture import capture, set_attr
    from ..config import GPTQConfig
    from ..export.from_graph import read_graph
    from ..export.records import ModelRecords
    from ..export.safe_output import atomic_output_dir
    from ..export.writer import _copy_side_files, _format_module, format_name, gq_specs
    from ..layerwise import LayerwiseRunner
    from ..passes import PassContext, PassManager
    from ..passes.gptq import GPTQLayer, algo_config, quantization_targets
    from ..passes.manager import registered_passes
    from ..passes.quantize import _gather_sites, make_observers, quantize_linears
    from ..patterns.base import AnalysisContext
    from ..patterns.report import analyze_graph
    from ..plan import make_plan
    from .checkpoint import CheckpointWeights, meta_model, retarget_devices
    from .units import ScopedPlans, make_units
    from .writer import StreamingShardWriter

    t0 = time.perf_counter()
    reset_peak_rss()  # the peak reported is this call's
    rss0 = rss_bytes()
    if output_dir is None:
        raise ConfigError("quantize_streamed writes a checkpoint: pass output_dir")
    config = _as_config(config)
    fmt = format_name(format)
    budget = parse_max_memory(max_memory)
    dev = _compute_device(device, budget)
    calib = _materialize(calib_data)
    weights = CheckpointWeights(model_dir)
    model = meta_model(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    if getattr(model.config, "tie_word_embeddings", False) and getattr(model, "get_output_embeddings", None) \
            and model.get_output_embeddings() is not None:
        raise ConfigError("streamed quantization does not support tied embeddings (tie_word_embeddings=True) yet; "
                          "use graphquant.quantize() on the loaded model")
    captured = capture(model, example_inputs)
    report = analyze_graph(captured)
    plan = make_plan(report, list(config.pre_quant_opt_config or []) + _smoothing_in_algo_config(config),
                     exclude=list(config.exclude or []))
    _check_supported(config, plan)
    algos = _algorithm_passes(config)
    gm = captured.gm
    retarget_devices(gm, dev)
    for target, b in list(gm.named_buffers()):
        if b.device.type != "meta" and b.device != dev:
            set_attr(gm, target, b.to(dev))
    units, _blocks = make_units(captured, plan)
    scoped = ScopedPlans(plan, units)
    order = [n for n in PassManager(plan.passes()).order if n != "smooth"]
    specs = registered_passes()

    ctx = PassContext(captured, report, plan, config=config, calib_data=calib)
    ctx.stats["keep_float_weights"] = False
    ctx.stats["progress"] = False
    all_linears = list(AnalysisContext(captured).linears.values())
    static = any(not s.spec.is_dynamic for s in _gather_sites(ctx, all_linears, config))
    gptq = "gptq" in algos
    limit = budget.get(str(dev) if dev.index is not None or dev.type != "cuda" else "cuda:0")
    cpu_limit = budget.get("cpu")
    from ..export.shards import parse_size

    shard_limit = parse_size(max_shard_size)
    if cpu_limit is not None:  # the pending shard is resident too
        shard_limit = min(shard_limit, max(cpu_limit // 16, 1 << 20))
    gptq_targets = [lin for lin, _ in quantization_targets(ctx, "GPTQ")] if gptq else []
    quantized = [lin for lin in all_linears if (lambda qc: qc is not None and qc.weight is not None
                                                and not qc.weight.is_cast)(config.resolve(lin.fqn, "Linear"))]
    estimate = _estimate(captured, units, calib, gptq_targets, quantized, int(bool(gptq_targets)) + int(static),
                         shard_limit if dev.type == "cpu" else 0, rewrites_here=dev.type == "cpu")
    if limit is not None and estimate["total"] > limit:
        raise ConfigError(
            f"max_memory {format_bytes(limit)} on {dev} is too small for streamed quantization: the largest unit "
            f"({estimate['largest_unit']}) holds {format_bytes(estimate['unit_weights'])} of weights, its rewrites, "
            f"GPTQ (float64) and weight quantization work on about "
            f"{format_bytes(max(estimate['rewrite_work'], estimate['algorithm_work']))}"
            f", the carried calibration activations take {format_bytes(estimate['activation_cache'])} and the pending "
            f"shard {format_bytes(estimate['pending_shard'])} (about {format_bytes(estimate['total'])} in all); raise "
            "the budget, or pass fewer / shorter calibration batches or a smaller max_shard_size")

    if cpu_limit is not None:
        _return_freed_memory_to_os()
    runner_g = runner_c = gptq_layer = None
    if gptq:
        cfg = algo_config(ctx, "gptq", GPTQConfig)
        targets = quantization_targets(ctx, "GPTQ")
        if targets:
            runner_g = LayerwiseRunner(captured, calib, all_linears, desc="GPTQ")
            gptq_layer = GPTQLayer(ctx, cfg, targets)
    if static:
        runner_c = LayerwiseRunner(captured, calib, all_linears, desc="activation calibration")

    mod = _format_module(fmt)
    skeleton_names = _skeleton(captured.model_class, captured.config, dtype)
    module_unit = {m: u.index for u in units for m in u.modules}
    spec_linears, spec_attention, rms, notes = {}, {}, {}, []
    side: dict = {}  # non-persistent buffers (RoPE inv_freq), as export.writer.save keeps them
    timings: list[UnitTiming] = []
    marker: dict = {}
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    peak = rss0
    from ..calibrate import progress_bar

    bar = progress_bar("streamed quantization", progress, total=len(units), unit="layer")
    with atomic_output_dir(output_dir, inputs=(model_dir,), overwrite=overwrite, marker=marker) as tmp:
        writer = StreamingShardWriter(tmp, shard_limit)
        for unit in units:
            tu = time.perf_counter()
            before = _targets(gm)
            here = dev  # the rewrites' float64 copies of a big embedding / lm_head may not fit a GPU budget
            if dev.type != "cpu" and limit is not None and sum(_unit_bytes(captured, unit)) + estimate["activation_cache"] > limit:
                here = torch.device("cpu")
            loaded = _load_unit(captured, unit, weights, here)  # 1. read the unit's weights
            ctx.plan = scoped.for_unit(unit)  # 2. the plan's rewrites at the unit's sites
            for name in order:
                ctx.current_pass = name
                specs[name].fn(ctx)
            ctx.current_pass = None
            gm.graph.lint()
            gm.recompile()
            if here != dev:
                _move_unit(captured, set(unit.targets) | (_targets(gm) - before), dev)
            if unit.index == 0:
                _start(runner_g, runner_c)
            lins = [lin for lin in AnalysisContext(captured).linears.values() if lin.node in unit.nodes]
            if gptq_layer is not None:  # 3. GPTQ on the carried activations
                ctx.current_pass = "gptq"
                fresh = [(lin, s) for lin, s in quantization_targets(ctx, "GPTQ") if lin.node in unit.nodes]
                gptq_layer.site_of.update({lin.node: lin for lin, _ in fresh})
                for block in unit.blocks:
                    gptq_layer.quantize_block(runner_g, block)
                    runner_g.advance(block)
            ctx.current_pass = "insert_qdq"  # 4. Q/DQ (static scales from the second carried cache)
            quantize_linears(ctx, lins, calibrate=_calibrator(runner_c, unit, make_observers),
                             keep_site=lambda s, u=unit: all(x in u.nodes for x in s.users))
            ctx.current_pass = None
            gm.graph.lint()
            gm.recompile()
            # 5. the unit's tensors into the checkpoint
            rec = read_graph(types.SimpleNamespace(gm=gm, captured=captured, log=ctx.log))

            def mine(fqn: str, _u=unit) -> bool:
                return _unit_of_module(module_unit, fqn, units[-1].index) == _u.index

            ours = {k: v for k, v in rec.float_weights.items() if mine(k.rsplit(".", 1)[0])}  # state-dict names
            side.update({k: v.detach().to("cpu").contiguous() for k, v in ours.items() if k not in skeleton_names})
            part = ModelRecords(rec.model_class, rec.config, {k: v for k, v in ours.items() if k in skeleton_names},
                                {k: v for k, v in rec.linears.items() if mine(k)},
                                {k: v for k, v in rec.attention.items() if mine(k)},
                                {k: v for k, v in rec.rms_norms.items() if mine(k)})
            writer.add(mod.tensors(part))
            spec_linears.update({k: _spec_only(v) for k, v in part.linears.items()})
            spec_attention.update(part.attention)
            rms.update(part.rms_norms)
            notes = rec.notes
            config_out = rec.config
            del rec, part
            _free_unit(captured, set(unit.targets) | (_targets(gm) - before))  # 6. free the unit
            _release_memory()
            now = rss_bytes()
            peak = max(peak, now, peak_rss_bytes())
            timings.append(UnitTiming(unit.name, time.perf_counter() - tu, loaded, now,
                                      torch.cuda.max_memory_allocated(dev) if cuda else None))
            bar.update(1)
        bar.close()
        writer.close()
        if side:
            from safetensors.torch import save_file

            from ..export.writer import BUFFERS

            save_file(side, str(tmp / BUFFERS))
        recs = ModelRecords(captured.model_class, config_out, {}, spec_linears, spec_attention, rms, list(notes))
        float_linears = [n for n in skeleton_names.linears if n not in spec_linears]
        qc = mod.quantization_config(recs, float_linears)
        from .. import __version__

        marker.update({"graphquant_version": __version__, "format": fmt, "model_class": recs.model_class,
                       "notes": list(recs.notes), "caveats": mod.caveats(recs), "specs": gq_specs(recs),
                       "online_rotations": recs.online_rotations, "rms_norms": dict(recs.rms_norms)})
        cfg = copy.deepcopy(recs.config)
        cfg.architectures = [recs.model_class]
        cfg.quantization_config = qc
        cfg.save_pretrained(str(tmp))
        _copy_side_files(tmp, recs, tokenizer, model_dir)
    weights.close()
    return StreamResult(Path(output_dir), dict(marker), timings, time.perf_counter() - t0, estimate,
                        max(peak, peak_rss_bytes()) - rss0,
                        torch.cuda.max_memory_allocated(dev) if cuda else None, ctx.log, report, plan)


def _load_unit(captured, unit, weights, device) -> int:
    """Read the unit's weights from the checkpoint into the graph (on ``device``); returns their bytes."""
    from ..capture import set_attr

    loaded = 0
    for t in unit.targets:
        meta = captured.param(t)
        name = next((n for n in captured.state_dict_names(t) if n in weights), None)
        if name is None:
            raise ConfigError(f"{weights.folder}: the checkpoint has no tensor for {captured.state_dict_names(t)}; "
                              "is it the checkpoint of this config?")
        value = weights.load(name, dtype=meta.dtype if meta.is_floating_point() else None, device=device)
        if tuple(value.shape) != tuple(meta.shape):
            raise ConfigError(f"{weights.folder}: {name} has shape {tuple(value.shape)}, the config says "
                              f"{tuple(meta.shape)}")
        set_attr(captured.gm, t, value)
        loaded += _nbytes(value)
    weights.close()  # unmap the shards: pages read stay resident while a file is mapped
    return loaded


def _free_unit(captured, targets) -> None:
    """Put the unit's tensors (loaded or created while it was processed) back on the meta device."""
    from ..capture import set_attr

    present = _targets(captured.gm)
    for t in targets:
        if t in present:
            v = captured.param(t)
            if v.device.type != "meta":
                set_attr(captured.gm, t, torch.empty(v.shape, dtype=v.dtype, device="meta"))


def _targets(gm) -> set[str]:
    return {t for t, _ in gm.named_parameters()} | {t for t, _ in gm.named_buffers()}


def _move_unit(captured, targets, device) -> None:
    from ..capture import set_attr

    present = _targets(captured.gm)
    for t in targets:
        if t in present:
            v = captured.param(t)
            if v.device.type != "meta" and v.device != device:
                set_attr(captured.gm, t, v.to(device))


def _unit_of_module(module_unit: dict, fqn: str, default: int) -> int:
    """The unit of a module: of its first node; else of its first submodule with nodes; else of its
    closest parent with nodes; else ``default`` (the last unit)."""
    if fqn in module_unit:
        return module_unit[fqn]
    sub = [u for m, u in module_unit.items() if m.startswith(fqn + ".")]
    if sub:
        return min(sub)
    parts = fqn.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in module_unit:
            return module_unit[".".join(parts[:i])]
    return default


def _start(*runners) -> None:
    """Cache the values live at the first layer's start (one forward over the embedding), shared."""
    runners = [r for r in runners if r is not None]
    if not runners:
        return
    runners[0].start()
    for r in runners[1:]:
        r.cache = [dict(c) for c in runners[0].cache]


def _calibrator(runner, unit, make_observers):
    """``calibrate(ctx, static)`` for ``quantize_linears``: observers fed from ``runner``'s cache, block by
    block, then the cache is carried past the unit (with the unit's quantized weights, before its
    activation quantizers are inserted, as the in-memory calibration sees the model)."""

    def calibrate(ctx, static):
        if runner is None:
            return {}
        observers, record = make_observers(static)
        idx = {n: i for i, n in enumerate(ctx.gm.graph.nodes)}
        starts = [idx[b.start] for b in unit.blocks]
        for bi, block in enumerate(unit.blocks):
            taps = {}
            for s in static:
                at = min(idx[u] for u in s.users)
                mine = max(i for i, st in enumerate(starts) if st <= at) if any(st <= at for st in starts) else 0
                if mine == bi:
                    taps[s.name] = s.node
            if taps:
                runner.run(block, taps, record)
            runner.advance(block)
        return {name: obs.calculate_qparams() for name, obs in observers.items()}

    return calibrate


def _spec_only(rec):
    """A LinearRecord without its tensors (for the quantization_config written at the end)."""
    out = copy.copy(rec)
    out.weight = torch.empty(rec.weight.shape, dtype=rec.weight.dtype, device="meta")
    out.bias = None
    return out


class _Names(set):
    linears: list


def _skeleton(model_class: str, config, dtype) -> _Names:
    """State-dict names (persistent) and Linear module names of the HF model, built on meta."""
    from ..export.hf_writeback import model_class as cls_of
    from .checkpoint import parameters_on_meta

    with parameters_on_meta():
        m = cls_of(model_class)._from_config(config, dtype=dtype)
    names = _Names(m.state_dict().keys())
    names.linears = [n for n, x in m.named_modules() if type(x) is nn.Linear]
    return names
