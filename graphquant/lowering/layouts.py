"""Weights in the layout each kernel reads, built from ``insert_qdq``'s quantized storage.

``insert_qdq`` keeps a Linear weight as codes (``weight_q``, one code per element in int8 / uint8 /
fp8 storage), ``weight_scale`` and (asymmetric schemes only) ``weight_zero_point`` in ``qparam_shape`` (per-tensor ``()``,
per-channel ``(N,)``, per-group ``(N, K // group)``). The functions here turn that into:

=================  ==========================================================================
int8 (W8A8/W8A16)  ``w`` int8 (N, K) row-major (cuBLASLt reads ``w.T`` as column-major ``B``),
                   ``scale`` fp32 ``()`` or ``(N,)``
fp8 (W8A8)         ``w`` float8_e4m3fn (N, K), ``scale`` fp32 ``()`` or ``(N,)``
int4 (W4A16)       unsigned nibbles ``u`` (signed codes + 8) packed two per byte, see
                   ``graphquant.kernels.int4_mm`` for the ``"nibble"`` and ``"cpu_tinygemm"``
                   layouts
=================  ==========================================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import QSchemeType, QuantizationSpec
from ..quant import formats as F

#: group sizes torch's int4 "tinygemm" kernels accept (``aten._weight_int4pack_mm_for_cpu`` and, on CUDA,
#: ``aten._weight_int4pack_mm``)
TINYGEMM_GROUPS = (32, 64, 128, 256)


@dataclass
class KernelWeight:
    """Tensors to register as buffers (name suffix -> tensor) plus the op's static arguments."""

    tensors: dict[str, torch.Tensor]
    args: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _scale(scale: torch.Tensor) -> torch.Tensor:
    s = scale.detach().to(torch.float32)
    return s.reshape(()) if s.numel() == 1 else s.reshape(-1).contiguous()


def int8_weight(qdata: torch.Tensor, scale: torch.Tensor) -> KernelWeight:
    """Symmetric int8 (or int4 codes held in int8) per-tensor / per-channel weight."""
    return KernelWeight({"qweight": qdata.detach().to(torch.int8).contiguous(), "qscale": _scale(scale)})


def fp8_weight(qdata: torch.Tensor, scale: torch.Tensor) -> KernelWeight:
    return KernelWeight({"qweight": qdata.detach().to(torch.float8_e4m3fn).contiguous(), "qscale": _scale(scale)})


def _uses_zero_point(spec: QuantizationSpec) -> bool:
    return spec.is_integer_format and not (spec.symmetric and F.int_format(spec.dtype).signed)


def int4_group_size(spec: QuantizationSpec, K: int) -> int:
    """Group size along K: the spec's for per_group, K for per_channel / per_tensor."""
    return int(spec.group_size) if spec.qscheme == QSchemeType.per_group else K


def int4_weight(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantizationSpec,
                dtype: torch.dtype) -> KernelWeight:
    """int4 / uint4 weight (per-group, per-channel or per-tensor) -> packed nibbles.

    ``dtype``: the activation dtype (the CPU layout stores its scales in it)."""
    N, K = qdata.shape
    g = int4_group_size(spec, K)
    signed = F.int_format(spec.dtype).signed
    u = qdata.detach().to(torch.int32) + (8 if signed else 0)  # unsigned nibbles 0..15
    s = scale.detach().to(torch.float32).reshape(N, -1) if scale.numel() > 1 else \
        scale.detach().to(torch.float32).reshape(1, 1).expand(N, 1)
    if _uses_zero_point(spec):
        zp = zero_point.detach().to(torch.int32)
        z = (zp.reshape(N, -1) if zp.numel() > 1 else zp.reshape(1, 1).expand(N, 1)) + (8 if signed else 0)
    else:
        z = torch.full_like(s, 8, dtype=torch.int32)
    s, z = s.expand(N, K // g).contiguous(), z.expand(N, K // g).contiguous()
    if qdata.device.type == "cpu" and N % 16 == 0 and g in TINYGEMM_GROUPS:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
        sz = _tinygemm_scale_and_zeros(s, z, dtype)
        return KernelWeight({"qweight": packed, "qscale": sz}, {"group_size": g, "layout": "cpu_tinygemm"})
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8).contiguous()
    tensors = {"qweight": packed, "qscale": s}
    if not bool((z == 8).all()):
        tensors["qzeros"] = z.to(torch.uint8)
    return KernelWeight(tensors, {"group_size": g, "layout": "nibble"})


def _tinygemm_scale_and_zeros(s: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tinygemm's ``(K/g, N, 2)`` scales and zeros for per-group ``s`` / shifted zero points ``z`` (N, K/g):
    tinygemm computes ``W = (u - 8) * s + zero``, so ``zero = (8 - z) * s``."""
    return torch.stack([s, (8 - z.to(torch.float32)) * s], dim=-1).transpose(0, 1).contiguous().to(dtype)


def int4_tinygemm_cuda(packed: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor | None, group: int,
                       dtype: torch.dtype) -> KernelWeight | None:
    """The ``"nibble"`` layout (CUDA tensors) re-packed for torch's own int4 decode kernel,
    ``aten._weight_int4pack_mm`` (tinygemm): codes by ``aten._convert_weight_to_int4pack`` (its input
    holds the even column in the high nibble, ours in the low one: the nibbles are swapped), scales and
    zeros in bf16 (``_tinygemm_scale_and_zeros``). None where tinygemm does not apply (not CUDA, not
    bf16, N not a multiple of 8, K not a multiple of 32 tiles, other group sizes). The scales are
    rounded to bf16 (the graph keeps them in fp32)."""
    N, half = packed.shape
    K = 2 * half
    if not packed.is_cuda or dtype != torch.bfloat16 or N % 8 or group not in TINYGEMM_GROUPS or K % group:
        return None
    inner = next((t for t in (8, 4, 2) if K % (16 * t) == 0), None)
    if inner is None:
        return None
    try:
        tg = torch.ops.aten._convert_weight_to_int4pack(((packed << 4) | (packed >> 4)).contiguous(), inner)
    except (RuntimeError, NotImplementedError):
        return None
    s = scale.to(torch.float32).reshape(N, -1)
    z = zeros.reshape(N, -1) if zeros is not None else torch.full_like(s, 8.0)
    return KernelWeight({"tg_weight": tg, "tg_scale_zeros": _tinygemm_scale_and_zeros(s, z, torch.bfloat16)},
                        {"group_size": group, "inner_k_tiles": inner})
