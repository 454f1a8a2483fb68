"""The compressed-tensors checkpoint format (what llm-compressor writes; vLLM and transformers load).

Facts used (compressed-tensors 0.20.1 source: ``quantization/quant_args.py``,
``quantization/lifecycle/initialize.py``, ``compressors/naive_quantized``,
``compressors/pack_quantized``, ``transform/``), field names only:

- ``config.json["quantization_config"]`` = {``quant_method`` "compressed-tensors", ``format``,
  ``quantization_status`` "compressed", ``config_groups`` {name: {``targets``, ``weights``,
  ``input_activations``, ``output_activations``, ``format``}}, ``ignore``, ``kv_cache_scheme``,
  ``transform_config``}; quantization args {``num_bits``, ``type`` int|float, ``symmetric``,
  ``strategy`` tensor|channel|group|token, ``group_size``, ``dynamic``}.
- per Linear: ``weight`` (int8 or float8_e4m3fn), ``weight_scale`` ((1,) tensor, (out, 1) channel,
  (out, groups) group), ``weight_zero_point`` only when asymmetric (int8), ``input_scale`` /
  ``input_zero_point`` (1,) when static; format ``int-quantized`` / ``float-quantized``;
  4-bit and lower: ``pack-quantized``, ``weight_packed`` int32 (out, ceil(in·bits/32)), values + 2^(bits-1)
  packed little-endian along the row, ``weight_shape`` (2,), asymmetric zero points packed the
  same way along dim 0; KV cache: ``<attention>.k_scale`` / ``v_scale`` (1,).
- online transforms: ``transform_config.config_groups`` {name: {``type``, ``apply``: [{``targets``,
  ``location``, ``inverse``}], ``randomize``, ``requires_grad``, ``head_dim``, ``precision``}}; the
  matrix of a module is ``<module>.<name>_<location>.weight``, unnormalised (divided by √n at
  run time); at location ``input`` the value becomes ``x @ M / √n``. Type ``random-hadamard``
  takes a stored ±1 matrix of any order (so 12·2^k, 44·2^k ... orders load); ``hadamard`` is
  rebuilt by vLLM for powers of two only.

graphquant's own numerics (spec op strings) are also kept in ``graphquant_export.json`` so that
``graphquant.load`` restores exactly what was quantized.
"""
from __future__ import annotations

import math
import re

import torch

from ..config import Dtype, QSchemeType, QuantizationSpec
from ..quant import fake_quant as FQ
from ..quant import formats as F
from .from_graph import ExportError
from .records import AttentionRecord, LinearRecord, ModelRecords, TensorQuantizer

QUANT_METHOD = "compressed-tensors"
R4_GROUP = "R4"
R3_GROUP = "R3"


# =========================================================================== packing
def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed ``bits``-bit codes (int) -> int32 words, ``32 // bits`` values per word along ``dim``,
    each stored as ``code + 2^(bits-1)``, the first value in the lowest bits. Padded with zeros."""
    if 32 % bits:
        raise ExportError(f"{bits}-bit packing is not supported here (4 and 2 are)")
    per = 32 // bits
    u = (codes.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    u = u if dim == 1 else u.t()
    n, k = u.shape
    pad = (-k) % per
    if pad:
        u = torch.cat([u, torch.zeros(n, pad, dtype=u.dtype)], dim=1)
    u = u.reshape(n, -1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (u << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words if dim == 1 else words.t().contiguous()


def unpack_int32(words: torch.Tensor, bits: int, shape, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: signed codes (int8) of ``shape``."""
    per = 32 // bits
    w = (words if dim == 1 else words.t()).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    u = ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], -1)
    rows, cols = (shape[0], shape[1]) if dim == 1 else (shape[1], shape[0])
    q = (u[:rows, :cols] - (1 << (bits - 1))).to(torch.int8)
    return q if dim == 1 else q.t().contiguous()


# =========================================================================== specs <-> args
def _bits_and_type(spec: QuantizationSpec) -> tuple[int, str]:
    if spec.is_mx or spec.is_cast:
        raise ExportError(f"{spec.to_op_str()}: no compressed-tensors equivalent here (MX / casts); use format='quark' "
                          "or another scheme")
    if spec.is_integer_format:
        return F.int_format(spec.dtype).bits, "int"
    if spec.dtype == Dtype.fp8_e4m3:
        return 8, "float"
    raise ExportError(f"{spec.dtype.value}: compressed-tensors stores int and fp8 e4m3 here; not {spec.dtype.value}")


def _strategy(spec: QuantizationSpec, role: str) -> str:
    qs = spec.qscheme
    if qs == QSchemeType.per_tensor:
        return "tensor"
    if qs == QSchemeType.per_token:
        return "token"
    if qs == QSchemeType.per_channel:
        if role == "weight" and spec.ch_axis in (0, -2):
            return "channel"
    if qs == QSchemeType.per_group and role == "weight" and spec.ch_axis in (-1, 1):
        return "group"
    raise ExportError(f"{role} spec {spec.to_op_str()} has no compressed-tensors strategy (tensor, channel along "
                      "out_features, group along in_features, token)")


def spec_to_args(spec: QuantizationSpec, role: str) -> dict:
    bits, typ = _bits_and_type(spec)
    args = {"num_bits": bits, "type": typ, "symmetric": bool(spec.symmetric), "strategy": _strategy(spec, role),
            "dynamic": bool(spec.is_dynamic), "group_size": int(spec.group_size) if spec.group_size else None,
            "block_structure": None, "actorder": None, "observer": "minmax" if not spec.is_dynamic else None,
            "observer_kwargs": {}}
    if spec.qscheme == QSchemeType.per_channel:
        args["group_size"] = None
    return args


def args_to_spec(args: dict, role: str) -> QuantizationSpec:
    """A compressed-tensors quantization args dict -> the graphquant spec with the same numerics."""
    bits, typ = int(args.get("num_bits", 8)), args.get("type", "int")
    if typ == "float":
        if bits != 8:
            raise ExportError(f"float{bits} compressed-tensors args are not supported here")
        dtype = "fp8_e4m3"
    else:
        dtype = {8: "int8", 4: "int4", 2: "int2"}.get(bits)
        if dtype is None:
            raise ExportError(f"int{bits} compressed-tensors args are not supported here")
    strategy = args.get("strategy") or ("group" if args.get("group_size") else "tensor")
    qscheme = {"tensor": "per_tensor", "channel": "per_channel", "group": "per_group", "token": "per_token"}.get(strategy)
    if qscheme is None:
        raise ExportError(f"compressed-tensors strategy {strategy!r} is not supported here")
    parts = [dtype, qscheme, "sym" if args.get("symmetric", True) else "asym",
             "dynamic" if args.get("dynamic") else "static", "float", "half_even"]
    if qscheme == "per_channel":
        parts.append("axis=0")
    if qscheme == "per_group":
        parts += ["axis=-1", f"group={int(args['group_size'])}"]
    return QuantizationSpec.from_op_str(":".join(parts))


def _signed(codes: torch.Tensor, zp: torch.Tensor | None, spec: QuantizationSpec):
    """Unsigned-format codes / zero points shifted to the signed range compressed-tensors stores."""
    fmt = F.int_format(spec.dtype)
    if fmt.signed:
        return codes, zp
    off = 1 << (fmt.bits - 1)
    return (codes.to(torch.int32) - off), (zp.to(torch.int32) - off if zp is not None else None)


def _linear_format(rec: LinearRecord) -> str:
    w = rec.weight_spec
    bits, typ = _bits_and_type(w)
    if typ == "float":
        return "float-quantized"
    if bits < 8:
        if rec.input is not None:
            raise ExportError(f"{w.to_op_str()} weights with quantized activations: compressed-tensors packs int4 "
                              "weights for weight-only schemes only; save with format='quark'")
        return "pack-quantized"
    return "int-quantized"


def _scale_layout(scale: torch.Tensor, spec: QuantizationSpec, n_out: int) -> torch.Tensor:
    s = scale.detach().float()
    if spec.qscheme == QSchemeType.per_tensor:
        return s.reshape(1)
    if spec.qscheme == QSchemeType.per_channel:
        return s.reshape(n_out, 1)
    return s.reshape(n_out, -1)


def linear_tensors(fqn: str, rec: LinearRecord) -> dict[str, torch.Tensor]:
    w = rec.weight_spec
    bits, typ = _bits_and_type(w)
    n_out = rec.shape[0]
    out = {}
    codes, zp = rec.weight, rec.weight_zero_point
    if typ == "int":
        codes, zp = _signed(codes, zp, w)
    if typ == "int" and bits < 8:
        out[f"{fqn}.weight_packed"] = pack_int32(codes, bits)
        out[f"{fqn}.weight_shape"] = torch.tensor(list(rec.shape), dtype=torch.int64)
        if zp is not None:
            out[f"{fqn}.weight_zero_point"] = pack_int32(_scale_layout(zp, w, n_out).to(torch.int32), bits, dim=0)
    else:
        out[f"{fqn}.weight"] = codes.to(torch.int8 if typ == "int" else torch.float8_e4m3fn).contiguous()
        if zp is not None:
            out[f"{fqn}.weight_zero_point"] = _scale_layout(zp, w, n_out).to(torch.int8)
    out[f"{fqn}.weight_scale"] = _scale_layout(rec.weight_scale, w, n_out)
    if rec.bias is not None:
        out[f"{fqn}.bias"] = rec.bias
    for role, q in (("input", rec.input), ("output", rec.output)):
        if q is not None and not q.dynamic:
            _check_act(q.spec, f"{fqn} {role}")
            out[f"{fqn}.{role}_scale"] = q.scale.detach().float().reshape(1)
            if q.zero_point is not None:
                out[f"{fqn}.{role}_zero_point"] = _signed(q.zero_point, q.zero_point, q.spec)[1].reshape(1).to(torch.int8)
    return out


def _check_act(spec: QuantizationSpec, where: str) -> None:
    if not spec.is_dynamic and spec.qscheme != QSchemeType.per_tensor:
        raise ExportError(f"{where}: static {spec.qscheme.value} activation scales have no compressed-tensors layout")


# =========================================================================== write
def _group_key(rec: LinearRecord) -> tuple:
    return (rec.weight_spec.to_op_str(), rec.input.spec.to_op_str() if rec.input else None,
            rec.output.spec.to_op_str() if rec.output else None, _linear_format(rec))


def quantization_config(rec: ModelRecords, float_linears: list[str]) -> dict:
    groups: dict[tuple, list[str]] = {}
    for fqn, lr in rec.linears.items():
        groups.setdefault(_group_key(lr), []).append(fqn)
    config_groups = {}
    single = len(groups) == 1
    for i, (key, names) in enumerate(groups.items()):
        lr = rec.linears[names[0]]
        config_groups[f"group_{i}"] = {
            "targets": ["Linear"] if single else sorted(names),
            "weights": spec_to_args(lr.weight_spec, "weight"),
            "input_activations": spec_to_args(lr.input.spec, "input") if lr.input else None,
            "output_activations": spec_to_args(lr.output.spec, "output") if lr.output else None,
            "format": key[3],
        }
    formats = {k[3] for k in groups}
    kv = _kv_scheme(rec)
    fmt = formats.pop() if len(formats) == 1 else ("mixed-precision" if formats else "dense")
    qc = {"quant_method": QUANT_METHOD, "format": fmt,
          "quantization_status": "compressed", "config_groups": config_groups,
          "ignore": sorted(float_linears) if single else [], "kv_cache_scheme": kv,
          "global_compression_ratio": None, "sparsity_config": {}}
    tc = transform_config(rec)
    if tc:
        qc["transform_config"] = tc
    return qc


def _kv_scheme(rec: ModelRecords):
    specs = {(a.k.spec.to_op_str() if a.k else None, a.v.spec.to_op_str() if a.v else None)
             for a in rec.attention.values() if a.k or a.v}
    if not specs:
        return None
    if len(specs) > 1 or any(None in s for s in specs):
        raise ExportError("compressed-tensors has one kv_cache_scheme for K and V of every layer; this model's KV "
                          f"quantizers differ ({sorted(map(str, specs))[:3]})")
    k, _ = specs.pop()
    spec = FQ.as_spec(k)
    if spec.qscheme != QSchemeType.per_tensor:
        raise ExportError(f"KV cache spec {k}: compressed-tensors KV scales are per tensor here")
    return spec_to_args(spec, "kv")


def transform_config(rec: ModelRecords) -> dict | None:
    groups = {}
    r4 = rec.online_rotations["R4"]
    if r4:
        groups[R4_GROUP] = {"type": "random-hadamard", "apply": [{"targets": sorted(r4), "location": "input",
                                                                 "inverse": False, "ignore": []}],
                            "randomize": False, "requires_grad": False, "head_dim": None, "precision": "float32"}
    r3 = rec.online_rotations["R3"]
    if r3:
        head_dim = _head_dim(rec)
        groups[R3_GROUP] = {"type": "random-hadamard",
                            "apply": [{"targets": sorted(r3), "location": "q_attn", "inverse": False, "ignore": []},
                                      {"targets": sorted(r3), "location": "k_cache", "inverse": False, "ignore": []}],
                            "randomize": False, "requires_grad": False, "head_dim": head_dim, "precision": "float32"}
    return {"config_groups": groups} if groups else None


def _head_dim(rec: ModelRecords) -> int:
    c = rec.config
    return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def hadamard_storage(n: int) -> torch.Tensor:
    """The unnormalised matrix M with ``x @ M / √n == x·Hᵀ`` (graphquant's online Hadamard)."""
    from ..hadamard import hadamard_matrix

    return (hadamard_matrix(n, dtype=torch.float64).t() * math.sqrt(n)).round().to(torch.float32).contiguous()


def tensors(rec: ModelRecords) -> dict[str, torch.Tensor]:
    out = dict(rec.float_weights)
    for fqn, lr in rec.linears.items():
        out.update(linear_tensors(fqn, lr))
        if lr.input_rotation:
            out[f"{fqn}.{R4_GROUP}_input.weight"] = hadamard_storage(lr.shape[1])
    for fqn, a in rec.attention.items():
        for role, q in (("k", a.k), ("v", a.v)):
            if q is not None:
                if q.dynamic:
                    raise ExportError(f"{fqn}: dynamic KV-cache quantization has no compressed-tensors tensors; "
                                      "compressed-tensors expects static k_scale / v_scale")
                out[f"{fqn}.{role}_scale"] = q.scale.detach().float().reshape(1)
        if a.r3:
            h = hadamard_storage(_head_dim(rec))
            out[f"{fqn}.{R3_GROUP}_q_attn.weight"] = h
            out[f"{fqn}.{R3_GROUP}_k_cache.weight"] = h.clone()
    return out


def caveats(rec: ModelRecords) -> list[str]:
    """What consumers of this checkpoint ignore (shown by the CLI, stored in graphquant_export.json)."""
    out = []
    specs = [q.spec for lr in rec.linears.values() for q in (lr.input, lr.output) if q is not None]
    if any(s.is_integer_format and s.symmetric and s.is_dynamic for s in specs):
        out.append("dynamic symmetric int activations: compressed-tensors' own fake-quant (used by transformers) "
                   "scales by amax/127.5 and clamps to [-128, 127], graphquant and vLLM by amax/127 in [-127, 127]: "
                   "transformers' logits differ slightly from graphquant's")
    elif any(s.is_integer_format and s.symmetric for s in specs):
        out.append("static symmetric int activations: compressed-tensors (transformers) clamps codes to [-128, 127], "
                   "graphquant to [-127, 127]; activations beyond the calibrated range differ by one step (the only "
                   "difference: with that clamp graphquant's numbers equal transformers' exactly)")
    if any(lr.weight_zero_point is not None and _linear_format(lr) == "pack-quantized" for lr in rec.linears.values()):
        out.append("asymmetric packed int4 weights: transformers 5.x fails to load their packed zero points "
                   "(compressed-tensors' own layout, an upstream limitation); graphquant.load and vLLM load them")
    rot = rec.online_rotations
    if rot["R4"]:
        out.append(f"online R4 Hadamard on the input of {len(rot['R4'])} Linear(s) is stored as transform_config "
                   "(random-hadamard, matrices in the checkpoint): graphquant.load and vLLM apply it; transformers "
                   "5.x ignores transform_config and computes WRONG logits without it")
    if rot["R3"]:
        kv = any(a.k is not None for a in rec.attention.values())
        out.append(f"online R3 Hadamard at {len(rot['R3'])} attention module(s) is stored as transform_config "
                   "(q_attn / k_cache): graphquant.load applies it; vLLM applies only Linear input/output transforms "
                   "and transformers none. R3 leaves q·kᵀ unchanged, so "
                   + ("with this quantized KV cache they quantize un-rotated K: their results DIFFER from graphquant's"
                      if kv else "without KV-cache quantization their logits are unaffected"))
    return out


# =========================================================================== read
def _targets_match(targets: list[str], name: str, module) -> bool:
    for t in targets:
        if t.startswith("re:"):
            if re.match(t[3:], name):
                return True
        elif t == name or t == type(module).__name__:
            return True
    return False


def read(qc: dict, tensors_: dict[str, torch.Tensor], model_skeleton, gq_specs: dict | None = None) -> tuple:
    """(linears, attention, float weights) of a compressed-tensors checkpoint. ``model_skeleton``:
    the HF model (any device; only module names and types are read). ``gq_specs``: graphquant's
    own spec strings by module (from graphquant_export.json), preferred over the args."""
    from torch import nn

    gq_specs = gq_specs or {}
    ignore = qc.get("ignore") or []
    taken: set[str] = set()
    linears: dict[str, LinearRecord] = {}
    for name, mod in model_skeleton.named_modules():
        if not isinstance(mod, nn.Linear) or _targets_match(ignore, name, mod):
            continue
        group = next((g for g in qc.get("config_groups", {}).values() if _targets_match(g.get("targets", []), name, mod)),
                     None)
        if group is None or group.get("weights") is None or f"{name}.weight_scale" not in tensors_:
            continue
        linears[name] = _read_linear(name, group, tensors_, taken, gq_specs.get(name, {}),
                                     next(mod.parameters()).dtype)
    attention: dict[str, AttentionRecord] = {}
    kv = qc.get("kv_cache_scheme")
    for key in list(tensors_):
        if key.endswith(".k_scale") and kv:
            fqn = key[: -len(".k_scale")]
            spec = FQ.as_spec(gq_specs.get(fqn, {}).get("kv")) if gq_specs.get(fqn, {}).get("kv") else args_to_spec(kv, "kv")
            attention.setdefault(fqn, AttentionRecord()).k = TensorQuantizer(spec, tensors_[key].float().reshape(()))
            vkey = f"{fqn}.v_scale"
            attention[fqn].v = TensorQuantizer(spec, tensors_[vkey].float().reshape(()))
            taken.update((key, vkey))
    for gname, g in ((qc.get("transform_config") or {}).get("config_groups") or {}).items():
        for ap in g.get("apply", []):
            for name, mod in model_skeleton.named_modules():
                if not _targets_match(ap.get("targets", []), name, mod):
                    continue
                key = f"{name}.{gname}_{ap['location']}.weight"
                m = tensors_.get(key)
                if m is None:
                    raise ExportError(f"transform {gname}/{ap['location']} of {name}: {key} is not in the checkpoint")
                _check_hadamard(m, key)
                taken.add(key)
                if ap["location"] == "input" and name in linears:
                    linears[name].input_rotation = "hadamard"
                elif ap["location"] in ("q_attn", "k_cache"):
                    attention.setdefault(name, AttentionRecord()).r3 = True
                else:
                    raise ExportError(f"transform location {ap['location']!r} at {name} is not supported by graphquant.load")
    weights = {k: v for k, v in tensors_.items() if k not in taken}
    return linears, attention, weights


def _check_hadamard(m: torch.Tensor, key: str) -> None:
    n = m.shape[0]
    ref = hadamard_storage(n)
    if not torch.equal(m.float(), ref):
        raise ExportError(f"{key}: this transform matrix is not graphquant's Hadamard of order {n}; graphquant.load "
                          "applies its own online Hadamard only")


def _read_linear(name, group, t, taken, gq, dtype) -> LinearRecord:
    def pop(k):
        key = f"{name}.{k}"
        if key not in t:
            return None
        taken.add(key)
        return t[key]

    wspec = FQ.as_spec(gq["weight"]) if gq.get("weight") else args_to_spec(group["weights"], "weight")
    packed = pop("weight_packed")
    zp = pop("weight_zero_point")
    scale = pop("weight_scale")
    fmt = F.int_format(wspec.dtype) if wspec.is_integer_format else None
    if packed is not None:
        shape = [int(v) for v in pop("weight_shape").tolist()]
        bits = fmt.bits
        codes = unpack_int32(packed, bits, shape)
        if zp is not None:
            zp = unpack_int32(zp, bits, (shape[0], scale.shape[-1]), dim=0)
    else:
        codes = pop("weight")
        shape = list(codes.shape)
    if fmt is not None:
        off = 0 if fmt.signed else 1 << (fmt.bits - 1)
        codes = (codes.to(torch.int32) + off).to(FQ.storage_dtype(wspec))
        if zp is not None:
            zp = zp.to(torch.int32) + off
    qshape = FQ.qparam_shape(shape, wspec)
    rec = LinearRecord(codes, wspec, scale.float().reshape(qshape),
                       zp.reshape(qshape).to(torch.int32) if zp is not None else None, pop("bias"), dtype)
    for role, args in (("input", group.get("input_activations")), ("output", group.get("output_activations"))):
        if not args:
            continue
        spec = FQ.as_spec(gq[role]) if gq.get(role) else args_to_spec(args, role)
        s, z = pop(f"{role}_scale"), pop(f"{role}_zero_point")
        if spec.is_dynamic:
            q = TensorQuantizer(spec)
        else:
            if z is not None and not F.int_format(spec.dtype).signed:
                z = z.to(torch.int32) + (1 << (F.int_format(spec.dtype).bits - 1))
            q = TensorQuantizer(spec, s.float().reshape(()), z.to(torch.int32).reshape(()) if z is not None else None)
        setattr(rec, role, q)
    return rec
