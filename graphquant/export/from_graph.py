"""Read a compiled graph (a ``QuantizedModel`` / ``GraphModel``) into :class:`~.records.ModelRecords`.

Only reads: the Q/DQ nodes ``insert_qdq`` tagged (``node.meta["graphquant_qdq"]``: weight,
input, output, kv_k, kv_v), the Hadamard nodes the online passes tagged (``meta["graphquant"]``
"R3" / "R4"), the log entries of the passes (untie, LayerNorm -> RMSNorm, R3 sites) and the
parameters with their state-dict names (``CapturedGraph.param_aliases``). Every ``graphquant::``
node must be accounted for; anything else (a user pass's custom op, a quantizer on a tensor no
Linear / attention reads) raises :class:`ExportError` instead of writing a model that computes
something else.
"""
from __future__ import annotations

import copy

import torch
from torch import fx

from ..capture import node_module_fqn
from ..errors import GraphQuantError
from ..quant import fake_quant as FQ
from .records import AttentionRecord, LinearRecord, ModelRecords, TensorQuantizer

QDQ_TAG = "graphquant_qdq"  # = graphquant.passes.quantize.QDQ_TAG (emitters read it, passes never import us)
LOWERED_TAG = "graphquant_lowered"
_LINEAR = torch.ops.aten.linear.default


class ExportError(GraphQuantError):
    """The compiled model has something an emitter cannot express faithfully."""


def _is_gq(node: fx.Node) -> bool:
    return node.op == "call_function" and str(getattr(node.target, "namespace", "")) == "graphquant"


def _op_name(node: fx.Node) -> str:
    return str(node.target).split(".")[1] if _is_gq(node) else str(node.target)


class _Reader:
    def __init__(self, qmodel):
        self.qm = qmodel
        self.cap = qmodel.captured
        self.gm = qmodel.gm
        self.used_nodes: set[fx.Node] = set()
        self.used_targets: set[str] = set()

    def tensor(self, node) -> torch.Tensor:
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            raise ExportError(f"expected a stored tensor, found node {node}")
        self.used_targets.add(str(node.target))
        return self.cap.param(str(node.target)).detach()

    def act_quantizer(self, node: fx.Node) -> TensorQuantizer:
        spec = FQ.as_spec(node.args[3] if _op_name(node) == "fake_quant_prefix" else node.args[-1])
        self.used_nodes.add(node)
        if _op_name(node) == "dynamic_fake_quant":
            return TensorQuantizer(spec)
        zp = self.tensor(node.args[2])
        q = TensorQuantizer(spec, self.tensor(node.args[1]).float(), zp if FQ._uses_zero_point(spec) else None)
        if _op_name(node) == "fake_quant_prefix":  # SinkTokenConfig: (x, scale, zp, spec, num_tokens, seq_dim, mode)
            q.sink_tokens, q.sink_mode = int(node.args[4]), str(node.args[6])
        return q

    # ------------------------------------------------------------------ Linears
    def linear(self, dq: fx.Node) -> tuple[str, LinearRecord]:
        info = dq.meta[QDQ_TAG]
        fqn = info["module"]
        lins = [u for u in dq.users if u.op == "call_function" and u.target == _LINEAR and u.args[1] is dq]
        if len(lins) != 1 or len(dq.users) != 1:
            raise ExportError(f"{fqn}: its quantized weight is not read by exactly one aten.linear "
                              f"(readers: {[str(u.target) for u in dq.users]}); only Linear layers can be exported")
        lin = lins[0]
        self.used_nodes.update((dq, lin))
        spec = FQ.as_spec(dq.args[3])
        out_dtype = dq.args[4] if len(dq.args) > 4 else dq.kwargs.get("out_dtype", torch.float32)
        zp = self.tensor(dq.args[2]) if dq.args[2] is not None else None
        rec = LinearRecord(weight=self.tensor(dq.args[0]), weight_spec=spec, weight_scale=self.tensor(dq.args[1]).float(),
                           weight_zero_point=zp if (zp is not None and FQ._uses_zero_point(spec)) else None,
                           dtype=out_dtype)
        bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        if bias is not None:
            rec.bias = self.tensor(bias)
        x = lin.args[0]
        if _is_gq(x) and x.meta.get(QDQ_TAG, {}).get("role") == "input":
            rec.input = self.act_quantizer(x)
            x = x.args[0]
        if _is_gq(x) and _op_name(x) == "hadamard_transform" and x.meta.get("graphquant") == "R4":
            if x.args[1] if len(x.args) > 1 else False:
                raise ExportError(f"{fqn}: transposed online Hadamard is not an R4 site")
            rec.input_rotation = "hadamard"
            self.used_nodes.add(x)
        outs = [u for u in lin.users if u.meta.get(QDQ_TAG, {}).get("role") == "output"]
        if outs:
            if len(lin.users) != 1:
                raise ExportError(f"{fqn}: its output quantizer does not feed every reader of the Linear")
            rec.output = self.act_quantizer(outs[0])
        return fqn, rec

    # ------------------------------------------------------------------ attention
    def attention(self) -> dict[str, AttentionRecord]:
        out: dict[str, AttentionRecord] = {}
        for e in self.qm.log:
            if e.get("action") == "online_hadamard" and e.get("site") == "R3":
                out.setdefault(e["module"], AttentionRecord()).r3 = True
        for n in self.gm.graph.nodes:
            if not _is_gq(n):
                continue
            role = n.meta.get(QDQ_TAG, {}).get("role")
            if role in ("kv_k", "kv_v"):
                name = n.meta[QDQ_TAG]["name"]
                attn = name.rsplit(".", 1)[0]
                setattr(out.setdefault(attn, AttentionRecord()), role[-1], self.act_quantizer(n))
            elif _op_name(n) == "hadamard_transform" and n.meta.get("graphquant") == "R3":
                self.used_nodes.add(n)
        return out

    # ------------------------------------------------------------------ everything else
    def layernorms_as_rms(self) -> dict[str, float]:
        names = {e["norm"] for e in self.qm.log if e.get("action") == "layernorm_to_rmsnorm"}
        out = {}
        for n in self.gm.graph.nodes:
            if n.op == "call_function" and n.target == torch.ops.aten.rms_norm.default and node_module_fqn(n) in names:
                if n.args[2] is not None:
                    raise ExportError(f"{node_module_fqn(n)}: converted RMSNorm kept a weight")
                out[node_module_fqn(n)] = float(n.args[3]) if len(n.args) > 3 and n.args[3] is not None else 1e-5
        missing = names - set(out)
        if missing:
            raise ExportError(f"LayerNorm -> RMSNorm conversion of {sorted(missing)} not found in the graph")
        return out

    def float_weights(self, quantized: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        """HF name -> tensor; single-name targets (untied copies) win over shared ones."""
        shared, own = {}, {}
        groups: dict[str, list[str]] = {}
        float_of_quantized = {n.meta[QDQ_TAG].get("float_weight") for n in self.gm.graph.nodes
                              if n.meta.get(QDQ_TAG, {}).get("role") == "weight"}
        items = list(self.gm.named_parameters(remove_duplicate=False)) + list(self.gm.named_buffers(remove_duplicate=False))
        for target, t in items:
            if target in self.used_targets or target in float_of_quantized:
                continue
            names = self.cap.param_aliases.get(target, [target])
            keep = [n for n in names if n.rsplit(".", 1)[0] not in quantized]
            if len(names) > 1:
                groups[target] = names
            td = t.detach()
            for n in keep:
                (shared if len(names) > 1 else own)[n] = td
        return {**shared, **own}, groups


def read_graph(qmodel) -> ModelRecords:
    """The records of a compiled graph (see the module docstring)."""
    gm = qmodel.gm
    if any(LOWERED_TAG in n.meta for n in gm.graph.nodes):
        raise ExportError("this model was lowered to kernels (quantize(..., lower=True)); export it before lowering: "
                          "quantize without lower=True, call to_hf()/save_pretrained(), and lower the HF model's "
                          "Linears with to_hf(kernels='auto')")
    if getattr(qmodel, "_bypassed", None):
        raise ExportError("quantizers are disabled (disable_quantizers()); call enable_quantizers() before exporting")
    r = _Reader(qmodel)
    linears = {}
    for n in list(gm.graph.nodes):
        if n.meta.get(QDQ_TAG, {}).get("role") == "weight" and _is_gq(n):
            fqn, rec = r.linear(n)
            linears[fqn] = rec
    attention = r.attention()
    rms = r.layernorms_as_rms()
    weights, groups = r.float_weights(set(linears))
    weights = {k: v for k, v in weights.items() if k.rsplit(".", 1)[0] not in rms}  # folded into the Linears
    leftovers = [n for n in gm.graph.nodes if _is_gq(n) and n not in r.used_nodes]
    if leftovers:
        what = ", ".join(f"{_op_name(n)} ({n.meta.get(QDQ_TAG, {}).get('name') or node_module_fqn(n) or n.name})"
                         for n in leftovers[:5])
        raise ExportError(f"{len(leftovers)} graphquant node(s) have no place in a Hugging Face model: {what}. "
                          "Only Linear weight/input/output quantizers, KV-cache quantizers and online R3/R4 "
                          "Hadamards can be exported")
    config = copy.deepcopy(qmodel.captured.config)
    if config is None:
        raise ExportError(f"{qmodel.captured.model_class} has no Hugging Face config; only transformers models "
                          "can be written back / saved")
    notes = []
    untied = _untied(weights, groups, linears)
    if untied and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
        notes.append(f"tied weights untied ({', '.join(untied)}): "
                     + ("quantized separately" if any(n.rsplit('.', 1)[0] in linears for n in untied)
                        else "rewritten separately (rotation / centering)"))
    return ModelRecords(qmodel.captured.model_class, config, weights, linears, attention, rms, notes)


def _untied(weights: dict, groups: dict, linears: dict) -> list[str]:
    """Names of originally tied tensors that no longer share one value."""
    out = []
    for target, names in groups.items():
        tensors = [weights.get(n) for n in names]
        if any(t is None for t in tensors) or any(t is not tensors[0] for t in tensors[1:]):
            out.extend(n for n in names if n not in out)
    return out
