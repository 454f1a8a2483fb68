"""AMD Quark's Hugging Face format (``quant_method: "quark"``; Quark's ``--model_export hf_format``).

Facts used (amd-quark 0.13: what ``quark.torch.export_safetensors`` writes for its ``int8``,
``fp8``, ``int4_wo_*`` and ``uint4_wo_*`` schemes on a Llama, and ``quark/torch/utils/pack.py``),
field names only:

- ``quantization_config`` = {``quant_method`` "quark", ``version``, ``quant_mode`` "eager_mode",
  ``global_quant_config``, ``layer_quant_config`` {fqn: config}, ``layer_type_quant_config``,
  ``exclude`` [fqn], ``algo_config``, ``kv_cache_quant_config``, ``kv_cache_post_rope``,
  ``softmax_quant_spec``, ``export`` {``kv_cache_group``, ``min_kv_scale``, ``pack_method``
  "reorder", ``weight_format`` "real_quantized", ``weight_merge_groups``}}; a config is
  {``input_tensors``, ``output_tensors``, ``weight``, ``bias``, ``target_device``} of specs
  {``dtype``, ``qscheme``, ``ch_axis``, ``group_size``, ``is_dynamic``, ``symmetric``,
  ``round_method``, ``scale_type``, ``observer_cls``, ``zero_point_type`` ...} (graphquant's
  ``QuantizationSpec`` mirrors them). Per-token activations are Quark's dynamic ``per_channel``
  with ``ch_axis`` 1 (its ``ptpc_fp8`` scheme).
- per Linear: ``weight`` (int8 / float8_e4m3fn codes; int4 / uint4 packed, see :func:`pack_int4`),
  ``weight_scale`` (``()`` per tensor, ``(out,)`` per channel, ``(groups, out)`` per group),
  ``weight_zero_point`` for int formats even when symmetric (its loader allocates one; int8, or
  packed int32 like the weight for 4 bits), ``input_scale`` / ``input_zero_point`` (``()``).
- int4 packing: the weight is transposed to ``(in, out)`` and 8 nibbles are packed per int32
  along ``out`` with the order ``0, 2, 4, 6, 1, 3, 5, 7`` (value ``j`` of a word at bits
  ``4·i`` where ``order[i] = j``); int4 codes as two's-complement nibbles, uint4 as they are.

Online rotations and the KV cache are not written in this format here (an :class:`ExportError`
says to use compressed-tensors); offline rewrites are in the weights as for every format.
"""
from __future__ import annotations

import torch

from ..config import Dtype, QSchemeType, QuantizationSpec
from ..quant import fake_quant as FQ
from ..quant import formats as F
from .from_graph import ExportError
from .records import LinearRecord, ModelRecords, TensorQuantizer

QUARK_VERSION = "0.13"
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_FLOAT8 = {Dtype.fp8_e4m3: torch.float8_e4m3fn}
_OBSERVERS = {"per_tensor": "PerTensorMinMaxObserver", "per_channel": "PerChannelMinMaxObserver",
              "per_group": "PerGroupMinMaxObserver"}


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(rows, cols) 4-bit codes (int4 signed or uint4) -> (rows, ceil(cols / 8)) int32, Quark's order."""
    u = codes.to(torch.int64) & 0xF
    rows, cols = u.shape
    pad = (-cols) % 8
    if pad:
        u = torch.cat([u, torch.zeros(rows, pad, dtype=u.dtype)], dim=1)
    u = u.reshape(rows, -1, 8)[:, :, list(ORDER)]
    words = (u << (torch.arange(8, dtype=torch.int64) * 4)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(words: torch.Tensor, cols: int, signed: bool) -> torch.Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    nib = (w.unsqueeze(-1) >> (torch.arange(8, dtype=torch.int64) * 4)) & 0xF  # position i
    out = torch.empty_like(nib)
    out[:, :, list(ORDER)] = nib
    out = out.reshape(w.shape[0], -1)[:, :cols]
    if signed:
        out = torch.where(out >= 8, out - 16, out)
    return out


# =========================================================================== specs
def spec_dict(spec: QuantizationSpec | None, role: str) -> dict | None:
    if spec is None:
        return None
    if spec.is_mx or spec.is_cast:
        raise ExportError(f"{spec.to_op_str()}: MX / cast specs are not written in Quark format here")
    qs = spec.qscheme.value
    ch_axis = spec.ch_axis
    if spec.qscheme == QSchemeType.per_token:
        qs, ch_axis = "per_channel", 1
    return {"dtype": spec.dtype.value, "qscheme": qs, "ch_axis": ch_axis,
            "group_size": int(spec.group_size) if spec.group_size else None, "is_dynamic": bool(spec.is_dynamic),
            "symmetric": bool(spec.symmetric), "round_method": spec.round_method.value,
            "scale_type": spec.scale_type.value, "observer_cls": _OBSERVERS.get(qs, "PerTensorMinMaxObserver"),
            "zero_point_type": "int32",
            "block_size": None, "mx_element_dtype": None, "is_scale_quant": False, "scale_format": None,
            "scale_calculation_mode": None, "enable_buffer_reuse": False, "max_input_numel": 4194304}


def dict_to_spec(d: dict | None, role: str) -> QuantizationSpec | None:
    if not d:
        return None
    qs = d["qscheme"]
    axis = d.get("ch_axis")
    if qs == "per_channel" and d.get("is_dynamic") and role != "weight":
        qs, axis = "per_token", None
    parts = [d["dtype"], qs, "sym" if d.get("symmetric", True) else "asym",
             "dynamic" if d.get("is_dynamic") else "static", d.get("scale_type") or "float",
             d.get("round_method") or "half_even"]
    if qs in ("per_channel", "per_group"):
        parts.append(f"axis={axis if axis is not None else (0 if qs == 'per_channel' else -1)}")
    if qs == "per_group":
        parts.append(f"group={int(d['group_size'])}")
    return QuantizationSpec.from_op_str(":".join(parts))


def _layer_config(lr: LinearRecord) -> dict:
    return {"weight": spec_dict(lr.weight_spec, "weight"),
            "input_tensors": spec_dict(lr.input.spec, "input") if lr.input else None,
            "output_tensors": spec_dict(lr.output.spec, "output") if lr.output else None,
            "bias": None, "target_device": None}


def _check(rec: ModelRecords) -> None:
    rot = rec.online_rotations
    if rot["R4"] or rot["R3"] or any(a.k or a.v for a in rec.attention.values()):
        raise ExportError("online R3/R4 rotations and KV-cache quantizers are not written in Quark format by this "
                          "version of graphquant; save with format='compressed-tensors' (graphquant.load applies them)")
    for fqn, lr in rec.linears.items():
        w = lr.weight_spec
        if w.dtype in (Dtype.int4, Dtype.uint4) and w.qscheme != QSchemeType.per_group:
            raise ExportError(f"{fqn}: 4-bit {w.qscheme.value} weights are written in Quark format for per_group only")
        if w.is_integer_format and F.int_format(w.dtype).bits not in (4, 8) or w.dtype == Dtype.uint8:
            raise ExportError(f"{fqn}: {w.dtype.value} weights are not written in Quark format here (int8, fp8 "
                              "e4m3, int4, uint4 are)")
        if not (w.is_integer_format or w.dtype in _FLOAT8):
            raise ExportError(f"{fqn}: {w.dtype.value} weights are not written in Quark format here")


def quantization_config(rec: ModelRecords, float_linears: list[str]) -> dict:
    _check(rec)
    configs = {fqn: _layer_config(lr) for fqn, lr in rec.linears.items()}
    counts: dict[str, int] = {}
    for c in configs.values():
        counts[repr(c)] = counts.get(repr(c), 0) + 1
    common = max(counts, key=counts.get) if counts else None
    glob = next((c for c in configs.values() if repr(c) == common), None) or \
        {"weight": None, "input_tensors": None, "output_tensors": None, "bias": None, "target_device": None}
    return {"quant_method": "quark", "version": QUARK_VERSION, "quant_mode": "eager_mode",
            "global_quant_config": glob,
            "layer_quant_config": {f: c for f, c in sorted(configs.items()) if repr(c) != common},
            "layer_type_quant_config": {}, "exclude": sorted(float_linears), "algo_config": None,
            "kv_cache_quant_config": {}, "kv_cache_post_rope": False, "softmax_quant_spec": None,
            "export": {"kv_cache_group": [], "min_kv_scale": 0.0, "pack_method": "reorder",
                       "weight_format": "real_quantized", "weight_merge_groups": None}}


def linear_tensors(fqn: str, lr: LinearRecord) -> dict[str, torch.Tensor]:
    w = lr.weight_spec
    out = {}
    n_out = lr.shape[0]
    scale = lr.weight_scale.float()
    zp = lr.weight_zero_point
    if w.is_integer_format and F.int_format(w.dtype).bits == 4:
        out[f"{fqn}.weight"] = pack_int4(lr.weight.t())
        out[f"{fqn}.weight_scale"] = scale.reshape(n_out, -1).t().contiguous()
        z = zp if zp is not None else torch.zeros_like(scale, dtype=torch.int32)
        out[f"{fqn}.weight_zero_point"] = pack_int4(z.reshape(n_out, -1).t())
    else:
        out[f"{fqn}.weight"] = lr.weight.contiguous()
        out[f"{fqn}.weight_scale"] = scale.reshape(()) if w.qscheme == QSchemeType.per_tensor else scale.reshape(n_out)
        if w.is_integer_format:
            z = zp if zp is not None else torch.zeros_like(scale, dtype=torch.int32)
            out[f"{fqn}.weight_zero_point"] = z.reshape(out[f"{fqn}.weight_scale"].shape).to(torch.int8)
    if lr.bias is not None:
        out[f"{fqn}.bias"] = lr.bias
    for role, q in (("input", lr.input), ("output", lr.output)):
        if q is None or q.dynamic:
            continue
        if q.spec.qscheme != QSchemeType.per_tensor:
            raise ExportError(f"{fqn}: static {q.spec.qscheme.value} {role} scales are not written in Quark format here")
        out[f"{fqn}.{role}_scale"] = q.scale.float().reshape(())
        if q.spec.is_integer_format:
            z = q.zero_point if q.zero_point is not None else torch.zeros((), dtype=torch.int32)
            out[f"{fqn}.{role}_zero_point"] = z.reshape(()).to(torch.int8)
    return out


def tensors(rec: ModelRecords) -> dict[str, torch.Tensor]:
    _check(rec)
    out = dict(rec.float_weights)
    for fqn, lr in rec.linears.items():
        out.update(linear_tensors(fqn, lr))
    return out


def caveats(rec: ModelRecords) -> list[str]:
    specs = [q.spec for lr in rec.linears.values() for q in (lr.input, lr.output) if q is not None]
    out = []
    if any(s.is_integer_format and s.symmetric for s in specs):
        out.append("symmetric int activations: Quark's fake-quant (used by transformers) uses the range [-128, 127] "
                   "(dynamic scales amax/127.5), graphquant [-127, 127] (amax/127): logits differ slightly")
    if any(s.qscheme == QSchemeType.per_token for s in specs):
        out.append("per-token activations are Quark's dynamic per_channel with ch_axis 1: vLLM computes them per "
                   "token; Quark's own fake-quant in transformers reduces over the batch, which is per token only "
                   "for batch size 1")
    return out


# =========================================================================== read
def read(qc: dict, t: dict[str, torch.Tensor], skeleton, gq_specs: dict | None = None) -> tuple:
    from torch import nn

    gq_specs = gq_specs or {}
    exclude = set(qc.get("exclude") or [])
    layer_cfg = qc.get("layer_quant_config") or {}
    taken: set[str] = set()
    linears = {}
    for name, mod in skeleton.named_modules():
        if not isinstance(mod, nn.Linear) or name in exclude or f"{name}.weight_scale" not in t:
            continue
        cfg = layer_cfg.get(name) or qc.get("global_quant_config") or {}
        gq = gq_specs.get(name, {})
        wspec = FQ.as_spec(gq["weight"]) if gq.get("weight") else dict_to_spec(cfg.get("weight"), "weight")

        def pop(k, name=name):
            key = f"{name}.{k}"
            if key in t:
                taken.add(key)
                return t[key]
            return None

        w, s, z = pop("weight"), pop("weight_scale").float(), pop("weight_zero_point")
        n_out, k_in = mod.out_features, mod.in_features
        if wspec.is_integer_format and F.int_format(wspec.dtype).bits == 4:
            signed = F.int_format(wspec.dtype).signed
            codes = unpack_int4(w, n_out, signed).t().contiguous().to(FQ.storage_dtype(wspec))
            s = s.t().contiguous()
            z = unpack_int4(z, n_out, signed).t().contiguous().to(torch.int32) if z is not None else None
        else:
            codes = w
            z = z.to(torch.int32) if z is not None else None
        qshape = FQ.qparam_shape((n_out, k_in), wspec)
        uses = FQ._uses_zero_point(wspec)
        rec = LinearRecord(codes, wspec, s.reshape(qshape), z.reshape(qshape) if (uses and z is not None) else None,
                           pop("bias"), next(mod.parameters()).dtype)
        for role, key in (("input", "input_tensors"), ("output", "output_tensors")):
            spec = FQ.as_spec(gq[role]) if gq.get(role) else dict_to_spec(cfg.get(key), role)
            if spec is None:
                continue
            sc, zz = pop(f"{role}_scale"), pop(f"{role}_zero_point")
            setattr(rec, role, TensorQuantizer(spec) if spec.is_dynamic else TensorQuantizer(
                spec, sc.float().reshape(()), zz.to(torch.int32).reshape(()) if (zz is not None and
                                                                               FQ._uses_zero_point(spec)) else None))
        linears[name] = rec
    weights = {k: v for k, v in t.items() if k not in taken}
    return linears, {}, weights
