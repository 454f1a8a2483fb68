"""``insert_qdq``: quantize/dequantize nodes for weights, input tensors and the KV cache.

Per Linear, ``Config.resolve(fqn, "Linear")`` gives the ``QuantizationConfig`` (precedence:
exclude > layer_quant_config > layer_type_quant_config > global_quant_config).

- weights are quantized once, offline: the float parameter is replaced by low-precision storage
  (``<fqn>.weight_q``, ``weight_scale``, and ``weight_zero_point`` only for schemes that have one:
  symmetric signed ints and floats store none) read through ``graphquant::dequantize``;
- input tensors: dynamic specs insert ``graphquant::dynamic_fake_quant`` (qparams computed at run
  time per tensor / token / group); static specs are calibrated with observers, then
  ``graphquant::fake_quant`` with the scale as a buffer. Linears reading the same tensor with the
  same spec share one quantizer (q/k/v, gate/up);
- output tensors of a Linear get a quantizer after it, except for k_proj / v_proj (and fused qkv)
  whose output spec, like ``Config.kv_cache_quant_config``, is applied at the KV-cache site the
  graph found: K after RoPE (and after R3), V as attention reads it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..calibrate import probes, run_batches, valid_tokens
from ..capture import set_attr
from ..errors import CalibrationError, ConfigError
from ..patterns.base import AnalysisContext
from . import weights as W
from .manager import PassContext, register_pass

QDQ_TAG = "graphquant_qdq"


@dataclass
class ActSite:
    """One activation quantizer: a tensor, a spec, and the Linears / roles it serves."""

    node: fx.Node
    spec: object  # QuantizationSpec
    users: list = field(default_factory=list)  # nodes whose input is replaced
    name: str = ""
    role: str = "input"


def _ops():
    from ..quant import ops  # noqa: F401  registers graphquant::* ops

    return torch.ops.graphquant


def _check_weight_specs(linears, config) -> None:
    """Fail before any change when a weight spec cannot apply (e.g. group size vs in_features)."""
    problems = []
    for lin in linears:
        qc = config.resolve(lin.fqn, "Linear")
        spec = qc.weight if qc is not None else None
        if spec is None or getattr(spec, "is_cast", False):
            continue
        gs = getattr(spec, "group_size", None)
        # per_group: a group_size that does not divide in_features leaves a shorter last group (as
        # compressed-tensors / vLLM do); MX blocks must divide
        if gs and spec.is_mx and lin.in_features % gs:
            problems.append(f"{lin.fqn}: MX block size {gs} does not divide in_features {lin.in_features}")
    if problems:
        raise ConfigError("weight quantization spec does not fit: " + "; ".join(problems[:5])
                          + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
                          + ". Choose a block size that divides every in_features, or exclude these layers")


def _replace_weight(ctx: PassContext, lin, spec) -> None:
    from ..quant.fake_quant import _uses_zero_point, quantize_weight

    target = W.own_weight(ctx, lin)
    w = ctx.captured.param(target).detach()
    try:
        qw = quantize_weight(w.float(), spec)
    except ConfigError as e:
        raise ConfigError(f"{lin.fqn}: {e}") from None
    gm = ctx.gm
    base = lin.fqn
    stored = [("weight_q", qw.qdata), ("weight_scale", qw.scale)]
    if _uses_zero_point(spec):  # symmetric signed ints and floats have none (all zeros): not stored
        stored.append(("weight_zero_point", qw.zero_point))
    for suffix, t in stored:
        set_attr(gm, f"{base}.{suffix}", t.to(w.device))
    g = gm.graph
    attr = lin.node.args[1]
    with g.inserting_before(lin.node):
        nodes = [g.get_attr(f"{base}.{s}") for s, _ in stored]
        if len(nodes) == 2:
            nodes.append(None)
        dq = g.call_function(_ops().dequantize.default, (*nodes, spec.to_op_str(), w.dtype))
    dq.meta["val"] = attr.meta.get("val")
    dq.meta[QDQ_TAG] = {"role": "weight", "module": lin.fqn, "float_weight": target, "spec": spec.to_op_str()}
    lin.node.replace_input_with(attr, dq)
    if not ctx.stats.get("keep_float_weights"):
        src = W._get_attr_node(attr)
        if not W._consumers(src) - {lin.node}:
            _delete_param(gm, target)
    ctx.record(action="quantize_weight", module=lin.fqn, spec=spec.to_op_str(), shape=list(w.shape),
               storage=str(qw.qdata.dtype).replace("torch.", ""))


def _delete_param(gm: nn.Module, target: str) -> None:
    mod = gm
    *path, leaf = target.split(".")
    for p in path:
        mod = getattr(mod, p)
    if leaf in mod._parameters:
        mod._parameters[leaf] = None
        del mod._parameters[leaf]
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and n.target == target and not n.users:
            gm.graph.erase_node(n)


def _kv_sites(ctx: PassContext, config) -> list[ActSite]:
    """KV-cache quantizers at the sites ``attention_qk`` found (K after RoPE/R3, V as read)."""
    sites = []
    for p in ctx.report.of_kind("attention_qk"):
        site = p.nodes["site"]
        for role, proj in (("k", p.details.get("k_proj")), ("v", None)):
            spec = config.kv_cache_quant_config
            if spec is None:
                # Quark style: output_tensors on k_proj / v_proj
                vo = next((q for q in ctx.report.of_kind("attention_vo") if q.nodes["site"] is site), None)
                fqn = proj if role == "k" else (vo.details["v_proj"] if vo else None)
                qc = config.resolve(fqn, "Linear") if fqn else None
                spec = qc.output_tensors if qc is not None else None
            if spec is None:
                continue
            node = getattr(site, role)
            consumer = site.out if site.kind == "sdpa" else next(iter(node.users))
            sites.append(ActSite(node, spec, [consumer], name=f"{site.fqn}.{role}_cache", role=f"kv_{role}"))
    return sites


def _kv_projection_fqns(ctx: PassContext) -> set[str]:
    out = set()
    for p in ctx.report.of_kind("attention_qk"):
        if p.details.get("k_proj"):
            out.add(p.details["k_proj"])
    for p in ctx.report.of_kind("attention_vo"):
        out.add(p.details["v_proj"])
    return out


def _gather_sites(ctx: PassContext, linears, config) -> list[ActSite]:
    sites: dict[tuple, ActSite] = {}
    kv_proj = _kv_projection_fqns(ctx)
    for lin in linears:
        qc = config.resolve(lin.fqn, "Linear")
        if qc is None:
            continue
        spec = qc.input_tensors
        if spec is not None and not getattr(spec, "is_cast", False):
            x = lin.node.args[0]
            key = (x, spec.to_op_str(), "input")
            s = sites.setdefault(key, ActSite(x, spec, [], name=f"{lin.fqn}.input", role="input"))
            s.users.append(lin.node)
        out_spec = qc.output_tensors
        if out_spec is not None and lin.fqn not in kv_proj and config.kv_cache_quant_config is None:
            users = [u for u in lin.node.users]
            sites[(lin.node, out_spec.to_op_str(), "output")] = ActSite(lin.node, out_spec, users,
                                                                         name=f"{lin.fqn}.output", role="output")
    out = list(sites.values())
    out += _kv_sites(ctx, config)
    return out


def make_observers(static: list[ActSite]) -> tuple[dict, object]:
    """One observer per static site, and ``record(name, x)`` feeding them (for probes)."""
    from ..quant.observers import observer_by_name

    observers = {}
    for s in static:
        cls = s.spec.observer_cls
        if isinstance(cls, str):
            cls = observer_by_name(cls)
        observers[s.name] = cls(s.spec)

    def record(key, x):
        x = valid_tokens(x.detach())  # padding tokens stay out of the statistics
        if not x.numel():
            return
        try:
            observers[key].observe(x)
        except CalibrationError as e:
            raise CalibrationError(f"at {key}: {e}") from None

    return observers, record


def _calibrate(ctx: PassContext, static: list[ActSite]) -> dict[str, tuple]:
    observers, record = make_observers(static)

    if ctx.calib_data is None:
        raise CalibrationError(f"static activation quantization ({len(static)} tensors, e.g. {static[0].name}) needs "
                               "calibration data: pass calib_data, or use a dynamic (per-token) activation scheme")
    with probes(ctx.gm, {s.name: s.node for s in static}, record):
        n = run_batches(ctx.captured, ctx.calib_data, desc="calibrating activations",
                        progress=ctx.stats.get("progress", True))
    ctx.stats["calibration_batches"] = n
    return {name: obs.calculate_qparams() for name, obs in observers.items()}


def _insert_act(ctx: PassContext, s: ActSite, qparams=None) -> None:
    g = ctx.gm.graph
    ops = _ops()
    anchor = min(s.users, key=lambda u: _order(ctx, u)) if s.users else None
    where = g.inserting_before(anchor) if anchor is not None else g.inserting_after(s.node)
    spec_str = s.spec.to_op_str()
    with where:
        if qparams is None:
            q = g.call_function(ops.dynamic_fake_quant.default, (s.node, spec_str))
        else:
            scale, zp = qparams
            set_attr(ctx.gm, f"{s.name}_scale", scale.detach().float())
            set_attr(ctx.gm, f"{s.name}_zero_point", zp.detach())
            sa, za = g.get_attr(f"{s.name}_scale"), g.get_attr(f"{s.name}_zero_point")
            q = g.call_function(ops.fake_quant.default, (s.node, sa, za, spec_str))
    if "val" in s.node.meta:
        q.meta["val"] = s.node.meta["val"]
    q.meta[QDQ_TAG] = {"role": s.role, "name": s.name, "spec": spec_str, "dynamic": qparams is None}
    for u in s.users:
        u.replace_input_with(s.node, q)
    ctx.record(action="quantize_activation", tensor=s.name, role=s.role, spec=spec_str,
               dynamic=qparams is None, consumers=len(s.users))


def _order(ctx: PassContext, node: fx.Node) -> int:
    if "_order" not in ctx.stats:
        ctx.stats["_order"] = {n: i for i, n in enumerate(ctx.gm.graph.nodes)}
    return ctx.stats["_order"].get(node, 1 << 40)


@register_pass("insert_qdq", stage="quantize", _builtin=True)
def insert_qdq(ctx: PassContext) -> None:
    config = ctx.config
    if config is None:
        return
    linears = list(AnalysisContext(ctx.captured).linears.values())
    unmatched = config.unmatched_exclude([lin.fqn for lin in linears])
    if unmatched:
        names = [lin.fqn for lin in linears]
        warnings.warn(f"graphquant: exclude pattern(s) {unmatched} match no layer. Layer names are: "
                      f"{names[:12]}{' ...' if len(names) > 12 else ''}", stacklevel=2)
    quantize_linears(ctx, linears)


def quantize_linears(ctx: PassContext, linears: list, calibrate=None, keep_site=None) -> list[ActSite]:
    """``insert_qdq`` for ``linears``: weights replaced by their quantized storage, then the
    activation quantizers (static ones calibrated by ``calibrate(ctx, static_sites) -> {name: qparams}``,
    called after the weights are replaced, also when there is no static site; by default one run of the
    whole graph over the calibration data, skipped without static sites). ``keep_site(site)``: which
    activation sites (including KV-cache sites) to handle; the streamed pipeline passes those of
    the resident layer. Returns the activation sites handled."""
    config = ctx.config
    _check_weight_specs(linears, config)
    if linears and all(config.resolve(lin.fqn, "Linear") is None for lin in linears):
        why = (f"every Linear matches exclude={config.exclude!r}" if any(config.is_excluded(lin.fqn) for lin in linears)
               else "the config quantizes no tensor")
        warnings.warn(f"graphquant: nothing will be quantized: {why}; the result computes the float model. "
                      "Exclude layers by name instead, e.g. exclude=['*lm_head']", UserWarning, stacklevel=2)
    sites = _gather_sites(ctx, linears, config)  # before the graph changes
    if keep_site is not None:
        sites = [s for s in sites if keep_site(s)]
    for lin in linears:
        qc = config.resolve(lin.fqn, "Linear")
        if qc is not None and qc.weight is not None and not getattr(qc.weight, "is_cast", False):
            _replace_weight(ctx, lin, qc.weight)
        elif qc is None:
            ctx.record(action="skip", module=lin.fqn, reason="excluded or no quantization config")
    ctx.stats.pop("_order", None)
    static = [s for s in sites if not s.spec.is_dynamic]
    if calibrate is not None:  # called even without static sites: the streamed pipeline advances its cache here
        qparams = calibrate(ctx, static)
    else:
        qparams = _calibrate(ctx, static) if static else {}
    ctx.stats.pop("_order", None)
    for s in sites:
        _insert_act(ctx, s, qparams.get(s.name) if not s.spec.is_dynamic else None)
    return sites
