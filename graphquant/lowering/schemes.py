"""Which kernel a quantized Linear lowers to — or, in words, why it stays fake-quant.

=========================  ===============================  ====================================
kernel                     weight                           activation
=========================  ===============================  ====================================
``int8_linear``            int8 sym (or int4 sym, held in   int8 sym: per-token dynamic,
                           int8) per-tensor / per-channel   per-tensor static or dynamic
``fp8_linear``             fp8 e4m3 per-tensor /            fp8 e4m3: per-token dynamic,
                           per-channel                      per-tensor static or dynamic
``int8_weight_only``       int8 sym per-tensor /            none (W8A16)
                           per-channel
``int4_linear``            int4 / uint4, sym or asym,       none (W4A16)
                           per-group / per-channel
=========================  ===============================  ====================================

Everything else (MX formats, fp6 / fp4, int2, asymmetric or per-channel activations, 4-bit
activations, float64 models) has no kernel here and keeps its fake-quant nodes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Dtype, QSchemeType, QuantizationSpec

KERNELS = {
    "int8_linear": "W8A8 int8: torch._int_mm / Triton, integer accumulation, scale epilogue",
    "fp8_linear": "W8A8 fp8 e4m3: torch._scaled_mm (per-tensor or row-wise scales) / Triton",
    "int8_weight_only": "W8A16: int8 weights, float activations (Triton GEMV / dequantize + matmul; CPU int8pack mm)",
    "int4_linear": "W4A16: packed int4 weights with group scales (Triton / CPU int4pack mm)",
}


@dataclass(frozen=True)
class Choice:
    kernel: str | None
    reason: str = ""


def _no(reason: str) -> Choice:
    return Choice(None, reason)


def _per_channel_or_tensor(spec: QuantizationSpec) -> bool:
    if spec.qscheme == QSchemeType.per_tensor:
        return True
    return spec.qscheme == QSchemeType.per_channel and spec.ch_axis in (0, -2)


def _describe(spec: QuantizationSpec) -> str:
    if spec.is_mx:
        return f"MX {spec.mx_element_dtype.value}"
    return f"{spec.dtype.value} {spec.qscheme.value}{'' if spec.symmetric else ' asym'}"


def _act_ok(spec: QuantizationSpec, dtype: Dtype) -> str:
    """'' when ``spec`` is an activation scheme the W8A8 kernels take, else the reason."""
    if spec.dtype != dtype:
        return f"{_describe(spec)} activations with {dtype.value} weights"
    if spec.is_integer_format and not spec.symmetric:
        return "asymmetric activations (a zero point per token / tensor) have no int8 kernel here"
    if spec.qscheme not in (QSchemeType.per_token, QSchemeType.per_tensor):
        return (f"{spec.qscheme.value} activation scales vary along the reduction dim and cannot be "
                "applied after the matmul")
    return ""


def choose(weight: QuantizationSpec, act: QuantizationSpec | None, in_features: int,
           out_dtype: torch.dtype) -> Choice:
    """The kernel for a Linear with ``weight`` / ``act`` (None: weight-only) specs."""
    if out_dtype == torch.float64:
        return _no("float64 model: the kernels compute in float32 / bf16")
    if weight.is_cast:
        return _no(f"{weight.dtype.value} weight cast: nothing to lower")
    if act is not None and act.is_cast:
        act = None  # bf16/fp16 activation cast: weight-only
    if weight.is_mx or (act is not None and act.is_mx):
        return _no("MX formats have no kernel on this device (needs Blackwell-class block-scaled MMA); "
                   "kept as fake-quant")
    if act is None:
        return _weight_only(weight, in_features)
    if act.dtype == Dtype.int8:
        why = _act_ok(act, Dtype.int8)
        if why:
            return _no(why)
        if weight.dtype in (Dtype.int8, Dtype.int4) and weight.symmetric and _per_channel_or_tensor(weight):
            return Choice("int8_linear")
        return _no(f"{_describe(weight)} weights with int8 activations: int8_linear needs symmetric int8/int4 "
                   "per-tensor or per-channel weights")
    if act.dtype == Dtype.fp8_e4m3:
        why = _act_ok(act, Dtype.fp8_e4m3)
        if why:
            return _no(why)
        if weight.dtype == Dtype.fp8_e4m3 and _per_channel_or_tensor(weight):
            return Choice("fp8_linear")
        return _no(f"{_describe(weight)} weights with fp8 activations: fp8_linear needs fp8 e4m3 per-tensor or "
                   "per-channel weights")
    return _no(f"{_describe(act)} activations have no kernel here (int8 and fp8 e4m3 do)")


def _weight_only(weight: QuantizationSpec, in_features: int) -> Choice:
    if weight.dtype == Dtype.int8 and weight.symmetric and _per_channel_or_tensor(weight):
        return Choice("int8_weight_only")
    if weight.dtype in (Dtype.int4, Dtype.uint4):
        if weight.qscheme == QSchemeType.per_group:
            g = int(weight.group_size)
            if weight.ch_axis not in (-1, 1):
                return _no("int4 groups along the output dim: the kernel groups along in_features")
            if in_features % g:
                return _no(f"int4 groups of {g} do not divide in_features {in_features} (shorter last group): "
                           "int4_linear needs equal groups; it stays fake-quant")
            if g % 2 or in_features % 2:
                return _no(f"int4 packing needs an even group size and in_features (group {g}, K {in_features})")
            return Choice("int4_linear")
        if _per_channel_or_tensor(weight) and in_features % 2 == 0:
            return Choice("int4_linear")
        return _no(f"{_describe(weight)} weights: int4_linear needs per-group or per-channel scales and even "
                   "in_features")
    return _no(f"{_describe(weight)} weight-only quantization has no kernel here (int8 and int4/uint4 do)")
