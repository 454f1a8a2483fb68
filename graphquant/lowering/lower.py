"""The ``lower`` pass: quantize/dequantize + ``aten.linear`` -> low-precision kernel ops.

Patterns (as ``insert_qdq`` writes them; ``A`` = ``fake_quant`` / ``dynamic_fake_quant``)::

    linear(A(x), dequantize(w_q, s, zp), b)     -> int8_linear / fp8_linear(quantize_act(x), w', s', b)
    linear(A(hadamard(x)), dequantize(...), b)  -> the same, the Hadamard folded into quantize_act
    linear(x, dequantize(w_q, s, zp), b)        -> int8_weight_only_linear / int4_linear(x, w', ...)

``schemes.choose`` picks the kernel; ``layouts`` builds its weight layout, registered as buffers
``<module>.qweight`` / ``qscale`` / ``qzeros``. One activation quantizer feeding several Linears
becomes one ``activation.quantize_act_*_node`` call (the ``graphquant::quantize_act_*`` op in
eager, fusible torch ops under ``torch.compile``). Q/DQ nodes and buffers nothing reads any more are removed.
What cannot be lowered (no kernel for the scheme, KV-cache and output quantizers) keeps its
fake-quant nodes, is listed in ``ctx.stats["lowering"]["fake_quant"]`` with the reason, and is
announced once per reason with ``warnings.warn``. The pass never fails on a scheme: anything
unexpected about one Linear becomes a fake-quant entry for that Linear.
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass

import torch
from torch import fx

from ..capture import node_module_fqn, set_attr
from ..passes.manager import PassContext, register_pass
from ..passes.quantize import QDQ_TAG
from ..quant import fake_quant as FQ
from . import activation, layouts, schemes
from . import ops as _ops  # noqa: F401  registers graphquant::*_linear, quantize_act_*

LOWERED_TAG = "graphquant_lowered"
_LINEAR = torch.ops.aten.linear.default

_ROLE_REASONS = {
    "kv_k": "KV-cache quantizer (K): attention reads fake-quantized K; no quantized-attention kernel here",
    "kv_v": "KV-cache quantizer (V): attention reads fake-quantized V; no quantized-attention kernel here",
    "output": "output quantizer: kept as fake-quant after the (lowered) Linear",
}


@dataclass
class LinearSite:
    """A Linear whose weight is read through ``graphquant::dequantize``."""

    node: fx.Node
    fqn: str
    dq: fx.Node
    w_spec: object  # QuantizationSpec
    act: fx.Node | None  # activation quantizer feeding the input, if any
    act_spec: object | None


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == target


def _gq():
    from ..quant import ops  # noqa: F401  registers graphquant::dequantize & co

    return torch.ops.graphquant


def _hadamard_target():
    op = getattr(torch.ops.graphquant, "hadamard_transform", None)
    return op.default if op is not None else None


def _act_targets():
    g = _gq()
    return (g.fake_quant.default, g.dynamic_fake_quant.default)


def find_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """Every ``aten.linear`` whose weight input is a ``graphquant::dequantize`` node."""
    dequantize = _gq().dequantize.default
    act_targets = _act_targets()
    sites = []
    for n in gm.graph.nodes:
        if not _is(n, _LINEAR) or len(n.args) < 2 or not _is(n.args[1], dequantize):
            continue
        dq = n.args[1]
        x = n.args[0]
        act = x if isinstance(x, fx.Node) and x.op == "call_function" and x.target in act_targets else None
        fqn = dq.meta.get(QDQ_TAG, {}).get("module") or node_module_fqn(n)
        sites.append(LinearSite(n, fqn, dq, FQ.as_spec(dq.args[3]), act,
                                FQ.as_spec(act.args[-1]) if act is not None else None))
    return sites


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


class _Lowerer:
    def __init__(self, ctx: PassContext):
        self.ctx = ctx
        self.gm = ctx.gm
        self.g = ctx.gm.graph
        self.order = {n: i for i, n in enumerate(self.g.nodes)}
        self.act_nodes: dict[fx.Node, tuple] = {}
        self.lowered: list[dict] = []
        self.fake: list[dict] = []
        self.dropped_targets: set[str] = set()
        self.bytes_before = 0
        self.bytes_after = 0

    # ------------------------------------------------------------------ helpers
    def tensor(self, node) -> torch.Tensor:
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            raise ValueError("weight codes / qparams are not stored tensors")
        return self.ctx.captured.param(str(node.target))

    def get_attr(self, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
        set_attr(self.gm, name, value)
        with self.g.inserting_before(before):
            return self.g.get_attr(name)

    def first_user(self, node: fx.Node) -> fx.Node:
        return min(node.users, key=lambda u: self.order.get(u, 1 << 40))

    def drop(self, node) -> None:
        """Erase ``node`` if nothing reads it, then its inputs that became unused (get_attr, Q/DQ, Hadamard)."""
        if not isinstance(node, fx.Node) or node.users or node.graph is not self.g:
            return
        inputs = node.all_input_nodes
        if node.op == "get_attr":
            self.dropped_targets.add(str(node.target))
        self.g.erase_node(node)
        removable = (*_act_targets(), _gq().dequantize.default, _hadamard_target())
        for i in inputs:
            if i.op == "get_attr" or (i.op == "call_function" and i.target in removable):
                self.drop(i)

    # ------------------------------------------------------------------ activation quantizers
    def quantized_input(self, site: LinearSite):
        """(codes node, scale node, hadamard folded) for the site's activation quantizer, built once."""
        a = site.act
        if a in self.act_nodes:
            return self.act_nodes[a]
        x = a.args[0]
        hadamard = (_is(x, _hadamard_target()) and len(x.args) > 1 and x.args[1] is False
                    and set(x.users) == {a})
        src = x.args[0] if hadamard else x
        spec = a.args[-1]
        with self.g.inserting_before(self.first_user(a)):
            if a.target == _gq().dynamic_fake_quant.default:
                qa = self.g.call_function(activation.quantize_act_dynamic_node, (src, spec, hadamard))
                q = self.g.call_function(operator.getitem, (qa, 0))
                s = self.g.call_function(operator.getitem, (qa, 1))
                nodes = (qa, q, s)
            else:
                s = a.args[1]
                q = self.g.call_function(activation.quantize_act_static_node, (src, s, spec, hadamard))
                nodes = (q,)
        for n in nodes:
            n.meta[LOWERED_TAG] = {"role": "activation", "name": a.meta.get(QDQ_TAG, {}).get("name", ""),
                                   "spec": spec, "hadamard": hadamard}
            for key in ("nn_module_stack", "stack_trace"):
                if key in a.meta:
                    n.meta[key] = a.meta[key]
        self.act_nodes[a] = (q, s, hadamard)
        return self.act_nodes[a]

    # ------------------------------------------------------------------ one Linear
    def lower_site(self, site: LinearSite) -> None:
        lin, dq = site.node, site.dq
        out_val = lin.meta.get("val")
        out_dtype = out_val.dtype if isinstance(out_val, torch.Tensor) else (
            dq.args[4] if len(dq.args) > 4 else dq.kwargs.get("out_dtype", torch.float32))
        qdata, scale, zp = (self.tensor(n) if n is not None else None for n in dq.args[:3])
        N, K = qdata.shape
        choice = schemes.choose(site.w_spec, site.act_spec, K, out_dtype)
        if choice.kernel is None:
            self.fake.append({"module": site.fqn, "reason": choice.reason})
            return
        if choice.kernel in ("int8_linear", "int8_weight_only"):
            kw = layouts.int8_weight(qdata, scale)
        elif choice.kernel == "fp8_linear":
            kw = layouts.fp8_weight(qdata, scale)
        else:
            kw = layouts.int4_weight(qdata, scale, zp, site.w_spec, out_dtype)
        bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        attrs = {}
        try:
            for k, t in kw.tensors.items():
                attrs[k] = self.get_attr(f"{site.fqn}.{k}", t, lin)
            entry = self._replace(site, choice.kernel, kw, attrs, bias, out_dtype, (int(N), int(K)))
        except Exception:
            for node in attrs.values():  # leave nothing half-written
                self.drop(node)
            raise
        self.drop(dq)
        self.bytes_before += _nbytes(qdata, scale, zp)
        self.bytes_after += kw.nbytes
        self.lowered.append(entry)

    def _replace(self, site: LinearSite, kernel: str, kw, attrs: dict, bias, out_dtype, shape) -> dict:
        """Insert the kernel op (and the shared activation quantizer) and retire the Linear."""
        lin = site.node
        hadamard = False
        if kernel in ("int8_linear", "fp8_linear"):
            q, s, hadamard = self.quantized_input(site)
            op = getattr(torch.ops.graphquant, kernel).default
            args = (q, s, attrs["qweight"], attrs["qscale"], bias, out_dtype)
        elif kernel == "int8_weight_only":
            op = torch.ops.graphquant.int8_weight_only_linear.default
            args = (lin.args[0], attrs["qweight"], attrs["qscale"], bias)
        else:
            op = torch.ops.graphquant.int4_linear.default
            args = (lin.args[0], attrs["qweight"], attrs["qscale"], attrs.get("qzeros"), bias,
                    kw.args["group_size"], kw.args["layout"])
        with self.g.inserting_before(lin):
            new = self.g.call_function(op, args)
        new.meta.update({k: v for k, v in lin.meta.items() if k != QDQ_TAG})
        entry = {"module": site.fqn, "kernel": kernel, "weight": site.w_spec.to_op_str(),
                 "activation": site.act_spec.to_op_str() if site.act_spec is not None else None,
                 "shape": list(shape), "weight_bytes": kw.nbytes, "fused_hadamard": hadamard, **kw.args}
        new.meta[LOWERED_TAG] = entry
        lin.replace_all_uses_with(new)
        self.g.erase_node(lin)
        return entry

    # ------------------------------------------------------------------ the whole graph
    def run(self) -> dict:
        for site in find_sites(self.gm):
            try:
                self.lower_site(site)
            except Exception as e:  # noqa: BLE001 - one odd layer must not break the model
                self.fake.append({"module": site.fqn, "reason": f"lowering failed: {type(e).__name__}: {e}"})
        for a in list(self.act_nodes):
            self.drop(a)
        self._report_remaining()
        self._delete_unused_attrs()
        return {"device": self._device(), "lowered": self.lowered, "fake_quant": self.fake,
                "weight_bytes": {"fake_quant_storage": self.bytes_before, "lowered": self.bytes_after}}

    def _report_remaining(self) -> None:
        seen = {e["module"] for e in self.fake}
        for n in self.g.nodes:
            info = n.meta.get(QDQ_TAG)
            if info is None:
                continue
            role = info.get("role")
            if role in _ROLE_REASONS:
                self.fake.append({"module": info.get("name", n.name), "reason": _ROLE_REASONS[role]})
            elif role == "weight" and info.get("module") not in seen:
                self.fake.append({"module": info.get("module", n.name),
                                  "reason": "weight not read by aten.linear (no kernel pattern for its consumer)"})

    def _delete_unused_attrs(self) -> None:
        live = {str(n.target) for n in self.g.nodes if n.op == "get_attr"}
        for target in self.dropped_targets - live:
            mod = self.gm
            *path, leaf = target.split(".")
            try:
                for p in path:
                    mod = getattr(mod, p)
            except AttributeError:
                continue
            mod._buffers.pop(leaf, None)
            mod._parameters.pop(leaf, None)

    def _device(self) -> str:
        for t in self.gm.buffers():
            return str(t.device)
        return "cpu"


def _warn(fake: list[dict]) -> None:
    by_reason: dict[str, list[str]] = {}
    for e in fake:
        by_reason.setdefault(e["reason"], []).append(e["module"])
    for reason, mods in by_reason.items():
        names = ", ".join(mods[:4]) + (f" (+{len(mods) - 4} more)" if len(mods) > 4 else "")
        warnings.warn(f"graphquant lower: {len(mods)} quantizer(s) stay fake-quant — {reason}: {names}",
                      UserWarning, stacklevel=3)


@register_pass("lower", stage="lower", _builtin=True)
def lower_pass(ctx: PassContext) -> None:
    """Replace Q/DQ + Linear with kernel ops (see the module docstring); fills
    ``ctx.stats["lowering"]`` = {"device", "lowered": [{module, kernel, ...}], "fake_quant": [{module,
    reason}], "weight_bytes"}."""
    report = _Lowerer(ctx).run()
    for e in report["lowered"]:
        ctx.record(action="lower", module=e["module"], kernel=e["kernel"], weight=e["weight"],
                   activation=e["activation"], weight_bytes=e["weight_bytes"], fused_hadamard=e["fused_hadamard"])
    for e in report["fake_quant"]:
        ctx.record(action="keep_fake_quant", module=e["module"], reason=e["reason"])
    if report["fake_quant"]:
        _warn(report["fake_quant"])
    ctx.stats["lowering"] = report


def lower_model(qmodel) -> dict:
    """Lower an already quantized ``QuantizedModel`` in place (what ``quantize(..., lower=True)``
    does as its last pass) and return its ``lowering`` report. Useful to compare a model's
    fake-quant and lowered outputs without quantizing twice."""
    if getattr(qmodel, "_bypassed", None):
        qmodel.enable_quantizers()
    ctx = PassContext(qmodel.captured, qmodel.report, qmodel.plan, config=getattr(qmodel, "quant_config", None))
    ctx.current_pass = "lower"
    lower_pass(ctx)
    qmodel.gm.graph.lint()
    qmodel.gm.recompile()
    qmodel.log.extend(ctx.log)
    qmodel.lowering = ctx.stats["lowering"]
    return qmodel.lowering
