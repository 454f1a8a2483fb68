"""``sink_tokens``: keep the first tokens of each sequence out of static activation ranges (PrefixQuant-style).

Pretrained LLMs put *massive activations* on the first token of a sequence (the attention sink), whatever
that token is: on SmolLM2-135M the input of ``layers.11.mlp.down_proj`` reaches 3065 at position 0 and 14
everywhere else (``benchmarks/accuracy.py --model smollm2 --stats``). A per-tensor *static* scale
calibrated with that token spends almost all of its 8-bit range on one token, and every other token is
quantized with a step 200x too coarse.

This pass runs after ``insert_qdq``. For every static activation quantizer (``graphquant::fake_quant``
with a calibrated scale: Linear inputs, outputs, the KV cache):

1. the scale is re-calibrated from the tokens at positions ``>= num_tokens`` only (same observer class
   as the spec names; the other activation quantizers are bypassed while calibrating, so statistics are
   taken on the float activations, as ``insert_qdq`` does);
2. the quantizer becomes ``graphquant::fake_quant_prefix``: tokens at positions ``< num_tokens`` are
   quantized per token, dynamically, in the same dtype (``mode="dynamic"``, the default: every
   activation is still int8 / fp8) or left in float (``mode="float"``); the rest use the static scale.

What is function-correct at inference: the rule is by *position in the sequence*. The captured graph runs
whole sequences from position 0 (no KV cache), so the sequence index is the position. With a KV cache
the prefix tokens are part of the prefill only (PrefixQuant computes their KV once, in high precision);
decode steps never see them and use the static scale. The sequence dimension of each quantized tensor is
found from the graph's shapes (the dimension that carries the ``input_ids`` length, see ``_seq_dim``).

``float_weights="kv"`` / ``"all"`` (``SinkTokenConfig``): the first tokens also go through the *float*
weights (and unquantized inputs) of the K/V projections, or of every quantized Linear. Causal attention
lets position 0 depend on itself only, so ``"all"`` is the float model's computation of that token (its
KV cache in full precision, as PrefixQuant's prefix KV); it keeps float copies of those weights
(``"kv"``: only k_proj / v_proj, small with GQA). ``graphquant::prefix_select`` picks the float rows.

Lowering: there is no int8 kernel for ``fake_quant_prefix`` yet; ``lower=True`` keeps the function
(``tests/test_accuracy_methods.py``) but those activation quantizers stay fake-quant.
"""
from __future__ import annotations

import contextlib

import torch
from torch import fx

from ..calibrate import probes, run_batches
from ..capture import set_attr
from ..errors import CalibrationError, ConfigError
from .manager import PassContext, register_pass
from .quantize import QDQ_TAG, _kv_projection_fqns

__all__ = ["fake_quant_prefix", "prefix_select", "sink_token_config", "sink_tokens"]


# ------------------------------------------------------------------------------------------ the op
def _prefix_fake_quant(x, scale, zero_point, spec, num_tokens, seq_dim, mode):
    from ..quant import fake_quant as FQ

    n = min(num_tokens, x.shape[seq_dim])
    rest = FQ.fake_quantize(x.narrow(seq_dim, n, x.shape[seq_dim] - n), scale, zero_point, spec)
    head = x.narrow(seq_dim, 0, n)
    if mode == "dynamic":
        head = FQ.dynamic_fake_quantize(head, _per_token_spec(spec))
    return torch.cat([head.to(rest.dtype), rest], dim=seq_dim)


def _per_token_spec(spec: str) -> str:
    from ..config import QSchemeType
    from ..quant.fake_quant import as_spec
    import dataclasses

    s = as_spec(spec)
    return dataclasses.replace(s, qscheme=QSchemeType.per_token, is_dynamic=True, observer_cls=None,
                               ch_axis=None).to_op_str()


@torch.library.custom_op("graphquant::fake_quant_prefix", mutates_args=())
def fake_quant_prefix(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: str,
                      num_tokens: int, seq_dim: int, mode: str) -> torch.Tensor:
    """Static fake-quant of ``x``, except the first ``num_tokens`` along ``seq_dim``: per-token dynamic
    (``mode="dynamic"``) or float (``mode="float"``)."""
    return _prefix_fake_quant(x, scale, zero_point, spec, num_tokens, seq_dim, mode)


@fake_quant_prefix.register_fake
def _(x, scale, zero_point, spec, num_tokens, seq_dim, mode):
    return torch.empty_like(x)


fake_quant_prefix.register_autograd(lambda ctx, grad: (grad,) + (None,) * 6,
                                    setup_context=lambda ctx, inputs, output: None)


# ------------------------------------------------------------------------------------------ the pass
def sink_token_config(config):
    """The ``SinkTokenConfig`` in ``config.algo_config`` (None when absent)."""
    algos = getattr(config, "algo_config", None) or []
    algos = algos if isinstance(algos, (list, tuple)) else [algos]
    return next((a for a in algos if type(a).__name__ == "SinkTokenConfig"), None)


def _seq_symbol(gm: fx.GraphModule):
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point():
            return v.shape[1]
    return None


def _seq_dim(node: fx.Node, seq) -> int | None:
    """The dimension of ``node``'s value that carries the sequence length ``seq`` (a symbol, or the example
    length): the last such dimension between the batch dimension and the feature dimension, so (B, T, C)
    gives 1 and (B, heads, T, head_dim) gives 2 even when heads or head_dim equal the example length."""
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor) or seq is None or v.dim() < 3:
        return None
    hits = [i for i in range(1, v.dim() - 1) if str(v.shape[i]) == str(seq)]
    return hits[-1] if hits else None


def _static_quantizers(gm: fx.GraphModule) -> list[fx.Node]:
    target = torch.ops.graphquant.fake_quant.default
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target
            and not n.meta.get(QDQ_TAG, {}).get("dynamic", True)]


def _bypass(x, *_args):
    return x


@contextlib.contextmanager
def _bypassed(gm: fx.GraphModule, nodes: list[fx.Node]):
    """Run the graph with these activation quantizers replaced by the identity."""
    saved = [(n, n.target) for n in nodes]
    try:
        for n in nodes:
            n.target = _bypass
        gm.recompile()
        yield
    finally:
        for n, t in saved:
            n.target = t
        gm.recompile()


def _observer(spec_str: str):
    from ..quant.fake_quant import as_spec
    from ..quant.observers import observer_by_name

    spec = as_spec(spec_str)
    cls = spec.observer_cls
    return (observer_by_name(cls) if isinstance(cls, str) else cls)(spec)


@register_pass("sink_tokens_keep_float", stage="algorithms", _builtin=True)
def sink_tokens_keep_float(ctx: PassContext) -> None:
    """With ``SinkTokenConfig(float_weights=...)``, ``insert_qdq`` must keep the float weights; the
    ``sink_tokens`` pass drops the ones it does not use."""
    cfg = sink_token_config(ctx.config)
    if cfg is None or cfg.float_weights == "none":
        return
    ctx.stats["sink_user_keeps_float"] = bool(ctx.stats.get("keep_float_weights"))
    ctx.stats["keep_float_weights"] = True
    ctx.record(action="keep_float_weights", reason=f"SinkTokenConfig(float_weights={cfg.float_weights!r})")


@register_pass("sink_tokens", stage="quantize", after="insert_qdq", _builtin=True)
def sink_tokens(ctx: PassContext) -> None:
    cfg = sink_token_config(ctx.config)
    if cfg is None:
        return
    gm = ctx.gm
    seq = _seq_symbol(gm)
    if seq is None:
        raise ConfigError("SinkTokenConfig needs a model whose input is token ids of shape (batch, seq_len); "
                          "this graph has no such input. Remove SinkTokenConfig from algo_config")
    if cfg.float_weights != "none":
        _float_weight_prefix(ctx, cfg, seq)
    nodes = _static_quantizers(gm)
    if not nodes:
        ctx.record(action="skip", reason="no static activation quantizers (dynamic scheme): nothing to do")
        return
    sites = {}
    for n in nodes:
        d = _seq_dim(n.args[0], seq)
        if d is None:
            ctx.record(action="skip", tensor=n.meta[QDQ_TAG].get("name"), reason="sequence dimension not found")
            continue
        sites[n] = d
    observers = {n.name: _observer(n.args[3]) for n in sites}

    def record(key, x):
        node = by_name[key]
        d = sites[node]
        if x.shape[d] > cfg.num_tokens:
            observers[key].observe(x.detach().narrow(d, cfg.num_tokens, x.shape[d] - cfg.num_tokens))

    by_name = {n.name: n for n in sites}
    with _bypassed(gm, nodes), probes(gm, {n.name: n.args[0] for n in sites}, record):
        run_batches(ctx.captured, ctx.calib_data, desc="calibrating (sink tokens excluded)",
                    progress=ctx.stats.get("progress", True))
    g = gm.graph
    for n, d in sites.items():
        obs = observers[n.name]
        if obs.num_observed == 0:
            raise CalibrationError(f"SinkTokenConfig: calibration sequences are not longer than num_tokens="
                                   f"{cfg.num_tokens}; use longer calibration windows")
        scale, zp = obs.calculate_qparams()
        name = n.meta[QDQ_TAG]["name"]
        old_scale = _attr(gm, n.args[1].target)
        set_attr(gm, n.args[1].target, scale.detach().float().to(old_scale.device))
        set_attr(gm, n.args[2].target, zp.detach().to(old_scale.device))
        with g.inserting_before(n):
            new = g.call_function(torch.ops.graphquant.fake_quant_prefix.default,
                                  (*n.args[:4], cfg.num_tokens, d, cfg.mode))
        new.meta = dict(n.meta)
        new.meta[QDQ_TAG] = {**n.meta[QDQ_TAG], "sink_tokens": cfg.num_tokens, "sink_mode": cfg.mode}
        n.replace_all_uses_with(new)
        g.erase_node(n)
        ctx.record(action="sink_tokens", tensor=name, seq_dim=d, num_tokens=cfg.num_tokens, mode=cfg.mode,
                   scale_before=float(old_scale.max()), scale_after=float(scale.max()))


def _attr(mod, target: str) -> torch.Tensor:
    for p in target.split("."):
        mod = getattr(mod, p)
    return mod


# ------------------------------------------------------------------------------------------ float weights
@torch.library.custom_op("graphquant::prefix_select", mutates_args=())
def prefix_select(head: torch.Tensor, tail: torch.Tensor, num_tokens: int, seq_dim: int) -> torch.Tensor:
    """``head`` at positions ``< num_tokens`` along ``seq_dim``, ``tail`` elsewhere."""
    n = min(num_tokens, tail.shape[seq_dim])
    return torch.cat([head.narrow(seq_dim, 0, n).to(tail.dtype), tail.narrow(seq_dim, n, tail.shape[seq_dim] - n)],
                     dim=seq_dim)


@prefix_select.register_fake
def _(head, tail, num_tokens, seq_dim):
    return torch.empty_like(tail)


prefix_select.register_autograd(lambda ctx, grad: (None, grad, None, None),
                                setup_context=lambda ctx, inputs, output: None)


def _float_weight_prefix(ctx: PassContext, cfg, seq) -> None:
    """The first tokens through the float weights and unquantized inputs: of the K/V projections
    (``float_weights="kv"``: the sink's KV cache in full precision, PrefixQuant's prefix KV) or of every
    quantized Linear (``"all"``: the sink token is computed in float end to end)."""
    from .quantize import _delete_param

    gm, g = ctx.gm, ctx.gm.graph
    kv = _kv_projection_fqns(ctx)
    weight_nodes = [n for n in g.nodes if n.meta.get(QDQ_TAG, {}).get("role") == "weight"]
    used = set()
    for dq in weight_nodes:
        info = dq.meta[QDQ_TAG]
        if cfg.float_weights == "kv" and info["module"] not in kv:
            continue
        for lin in list(dq.users):
            d = _seq_dim(lin, seq)
            if d is None:
                ctx.record(action="skip", module=info["module"], reason="sequence dimension not found")
                continue
            x = lin.args[0]
            xf = x.args[0] if isinstance(x, fx.Node) and x.meta.get(QDQ_TAG, {}).get("role") == "input" else x
            with g.inserting_before(lin):
                w = g.get_attr(info["float_weight"])
                head = g.call_function(lin.target, (xf, w, *lin.args[2:]), dict(lin.kwargs))
                head.meta["val"] = lin.meta.get("val")
            with g.inserting_after(lin):
                sel = g.call_function(torch.ops.graphquant.prefix_select.default, (head, lin, cfg.num_tokens, d))
                sel.meta["val"] = lin.meta.get("val")
            for u in list(lin.users):
                if u is not head and u is not sel:
                    u.replace_input_with(lin, sel)
            used.add(info["float_weight"])
            ctx.record(action="sink_float_weights", module=info["module"], num_tokens=cfg.num_tokens, seq_dim=d)
    if not ctx.stats.get("sink_user_keeps_float"):
        for dq in weight_nodes:
            target = dq.meta[QDQ_TAG]["float_weight"]
            shared = any(n.op == "get_attr" and n.target == target and n.users for n in g.nodes)
            if target not in used and not shared:
                _delete_param(gm, target)
    gm.recompile()
