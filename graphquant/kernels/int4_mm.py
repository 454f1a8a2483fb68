"""Weight-only int4 linears (W4A16): packed int4 weights with per-group scales / zero points.

``int4_linear(x, w_packed, scale, zero_point, bias, group_size, layout, hadamard=False, gated=False)`` computes
``x @ W.T + bias`` (``x`` first through QuaRot's online Hadamard with ``hadamard``; with ``gated`` ``x`` is a
gated MLP's gate|up pair and the product is of ``silu(gate) * up``) with
``W[n, k] = (u[n, k] - z[n, g]) * s[n, g]``, ``g = k // group_size``, where ``u`` are unsigned nibbles
(signed codes + 8) and ``z`` the (shifted) zero points (8 when ``zero_point`` is None). Two storage layouts
(chosen when lowering, for the device the weights are on; ``graphquant.lowering.layouts`` builds them):

``"nibble"``         ``w_packed`` uint8 (N, K/2), low nibble = even column; ``scale`` fp32 (N, K/g);
                     ``zero_point`` uint8 (N, K/g) or None. CUDA: for M <= ``WEIGHT_ONLY_M`` the decode kernel
                     ``quant_triton.decode_choice`` picks (``gemv``, ``gemv_packed``, ``wq_mm``, ``w4_f16mma``,
                     ``w4_i8mma``, ...), else a Triton dequantize to the activation dtype + cuBLAS.
                     Without Triton: torch unpack.
                     With ``hadamard`` at one row, where that kernel is ``w4_i8mma`` and the order's plan allows it,
                     the Hadamard makes ``w4_i8mma``'s int8 pieces in its epilogue
                     (``hadamard_triton.hadamard_pieces``): two launches instead of three. With ``gated`` at one
                     row, where that kernel is ``w4_i8mma``, its pieces launch computes the SiLU·mul from the pair
                     (Inductor's SiLU·mul kernel is left out: two launches instead of three).
``"cpu_tinygemm"``   ``w_packed`` from ``aten._convert_weight_to_int4pack_for_cpu``; ``scale`` is
                     ``qScaleAndZeros`` (K/g, N, 2) in the activation dtype (``W = (u - 8) * s + z``);
                     ``aten._weight_int4pack_mm_for_cpu`` computes the product.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .int8_mm import WEIGHT_ONLY_M, _flat, decode_kernel, glu_decode, guarded, interleaved_glu, triton_kernels

LAYOUTS = ("nibble", "cpu_tinygemm")


def unpack_nibbles(w_packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> uint8 codes (N, K), low nibble first."""
    lo = w_packed & 0xF
    hi = w_packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(w_packed.shape[0], -1)


def dequantize_nibble_torch(w_packed, scale, zero_point, group_size, dtype):
    u = unpack_nibbles(w_packed).to(torch.float32)
    N, K = u.shape
    s = scale.to(torch.float32).repeat_interleave(group_size, dim=1)
    z = zero_point.to(torch.float32).repeat_interleave(group_size, dim=1) if zero_point is not None else 8.0
    return ((u - z) * s).to(dtype)


def dequantize_nibble(w_packed, scale, zero_point, group_size, dtype):
    if w_packed.is_cuda and (qt := triton_kernels(w_packed.device, "dequant")) is not None:
        return guarded("dequant", lambda: qt.dequantize_weight(w_packed, scale, w_kind=qt.W_INT4,
                                                              K=2 * w_packed.shape[1], w_zero=zero_point,
                                                              group=group_size, out_dtype=dtype),
                       lambda: dequantize_nibble_torch(w_packed, scale, zero_point, group_size, dtype))
    return dequantize_nibble_torch(w_packed, scale, zero_point, group_size, dtype)


def _rotated_decode(a: torch.Tensor, w_packed, scale, zero_point, bias, group_size: int):
    """``hadamard(a) @ W.T + bias`` for one row on ``w4_i8mma`` with the pieces made by the Hadamard kernel, or None
    where that path does not apply (not CUDA / Triton, the decode table does not pick ``w4_i8mma`` for four groups
    per step, no fused plan for the order) or failed before."""
    if not (a.shape[0] == 1 and a.dtype in (torch.float16, torch.bfloat16)):
        return None
    if (fit := _decode_w4_i8mma(w_packed.shape[0], a.shape[1], group_size, a.device, "hadamard_pieces")) is None:
        return None
    qt, cfg = fit
    from . import hadamard_triton as HT

    if not HT.pieces_fusable(a.shape[1], group_size, 1):
        return None
    return guarded("hadamard_pieces", lambda: qt.w4_i8mma(a, w_packed, scale, w_zero=zero_point, bias=bias,
                                                          group=group_size, out_dtype=a.dtype, config=cfg,
                                                          pieces=HT.hadamard_pieces(a, group_size)),
                   lambda: None)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dim, in fp32, rounded to its dtype once."""
    g, u = gate_up.float().chunk(2, dim=-1)
    return (F.silu(g) * u).to(gate_up.dtype)


def _decode_w4_i8mma(N: int, K: int, group_size: int, device, path: str):
    """``(quant_triton, tile options)`` where the decode table runs ``w4_i8mma`` with four groups per step for one
    row of (N, K) int4 weights on ``device`` (CUDA, Triton, ``path`` not failed before), else None."""
    if device.type != "cuda" or (qt := triton_kernels(device, path)) is None:
        return None
    choice = qt.decode_choice(1, N, K, qt.A_FLOAT, qt.W_INT4, group_size, device)
    if choice is None or choice[0] != "w4_i8mma" or choice[1].get("GPS", 4) != 4:
        return None
    return qt, choice[1]


def gated_decode_fits(N: int, K: int, group_size: int, layout: str, device) -> bool:
    """Whether ``int4_linear(..., gated=True)`` makes ``w4_i8mma``'s operand from a gate|up pair at one row (the
    nibble layout, and the decode table picks ``w4_i8mma`` for this shape): ``generation.prepare`` routes a gated
    MLP's pair to the down projection only then (elsewhere Inductor's fused SiLU·mul kernel is as good)."""
    return layout == "nibble" and _decode_w4_i8mma(N, K, group_size, torch.device(device),
                                                   "w4_i8mma_gated") is not None


def _gated_decode(pair: torch.Tensor, w_packed, scale, zero_point, bias, group_size: int):
    """``silu(gate) * up @ W.T + bias`` for one gate|up pair on ``w4_i8mma``, its pieces launch computing the
    SiLU·mul, or None where that path does not apply or failed before."""
    if not (pair.shape[0] == 1 and pair.dtype in (torch.float16, torch.bfloat16) and pair.shape[1] % 2 == 0):
        return None
    if (fit := _decode_w4_i8mma(w_packed.shape[0], pair.shape[1] // 2, group_size, pair.device,
                                "w4_i8mma_gated")) is None:
        return None
    qt, cfg = fit
    return guarded("w4_i8mma_gated", lambda: qt.w4_i8mma(pair, w_packed, scale, w_zero=zero_point, bias=bias,
                                                         group=group_size, out_dtype=pair.dtype, config=cfg,
                                                         gated=True),
                   lambda: None)


def int4_linear(x: torch.Tensor, w_packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                bias: torch.Tensor | None, group_size: int, layout: str, hadamard: bool = False,
                gated: bool = False, glu: bool = False) -> torch.Tensor:
    N = w_packed.shape[0]
    if glu:  # silu(gate) * up of an interleaved gate|up weight: in the decode kernel's epilogue where it runs
        a = _flat(x)
        if (not (gated or hadamard) and layout == "nibble" and 0 < a.shape[0] <= WEIGHT_ONLY_M
                and a.dtype in (torch.float16, torch.bfloat16) and group_size % 16 == 0
                and (h := glu_decode(a, w_packed, scale, "int4", x.shape[:-1], w_zero=zero_point, bias=bias,
                                     group=group_size, out_dtype=a.dtype)) is not None):
            return h
        return interleaved_glu(int4_linear(x, w_packed, scale, zero_point, bias, group_size, layout, hadamard, gated))
    if gated:
        if not hadamard and layout == "nibble" and (out := _gated_decode(_flat(x), w_packed, scale, zero_point, bias,
                                                                         group_size)) is not None:
            return out.reshape(*x.shape[:-1], N)
        x = silu_mul(x)
    if hadamard:
        if layout == "nibble" and (out := _rotated_decode(_flat(x), w_packed, scale, zero_point, bias,
                                                         group_size)) is not None:
            return out.reshape(*x.shape[:-1], N)
        from .. import hadamard as _had  # noqa: F401  registers graphquant::hadamard_transform

        x = torch.ops.graphquant.hadamard_transform(x, False)
    lead = x.shape[:-1]
    a = _flat(x)
    M = a.shape[0]
    if layout == "cpu_tinygemm":
        if a.device.type != "cpu":
            raise RuntimeError("graphquant.int4_linear: this layer was lowered on CPU (tinygemm layout) and cannot "
                               f"run on {a.device}; lower the model on the device it will run on")
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(a, w_packed, group_size, scale.to(a.dtype))
        if bias is not None:
            out = out + bias
        return out.reshape(*lead, N)
    if layout != "nibble":
        raise ValueError(f"graphquant.int4_linear: unknown layout {layout!r}; expected one of {LAYOUTS}")

    def reference():
        return F.linear(a, dequantize_nibble(w_packed, scale, zero_point, group_size, a.dtype), bias)

    if M == 0:
        out = a.new_empty((0, N))
    elif (M <= WEIGHT_ONLY_M and a.dtype in (torch.float16, torch.bfloat16) and group_size % 16 == 0
          and (out := decode_kernel(a, w_packed, scale, "int4", w_zero=zero_point, bias=bias, group=group_size,
                                    out_dtype=a.dtype)) is not None):
        pass
    else:
        out = reference()
    return out.reshape(*lead, N)


def rms_norm(s: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's RMSNorm (Llama's): ``weight * (s · rsqrt(mean(s²) + eps))``, in fp32, the normalized rows
    rounded to ``s``'s dtype before the product with ``weight``."""
    h = s.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(s.dtype)


#: the widest row ``quant_triton.add_rms_norm_pieces`` takes (each program holds the whole row for its mean)
ADD_NORM_MAX_K = 16384


def add_norm_width_fits(K: int, group_size: int) -> bool:
    """Whether a ``K``-wide row is whole steps of four groups and at most :data:`ADD_NORM_MAX_K` wide."""
    return K % (4 * group_size) == 0 and K <= ADD_NORM_MAX_K


def _add_norm_fit(N: int, K: int, group_size: int, device):
    """``(quant_triton, tile options)`` where the residual add + RMSNorm + pieces launch can feed ``w4_i8mma`` for
    (N, K) int4 weights at one row on ``device`` (:func:`add_norm_width_fits`, :func:`_decode_w4_i8mma`), else None."""
    if not add_norm_width_fits(K, group_size):
        return None
    return _decode_w4_i8mma(N, K, group_size, torch.device(device), "add_rms_norm_pieces")


def add_norm_decode_fits(N: int, K: int, group_size: int, layout: str, device) -> bool:
    """Whether :func:`add_rms_norm_int4_linear` runs its one-launch residual add + RMSNorm + int8 pieces at one row:
    the nibble layout and :func:`_add_norm_fit`."""
    return layout == "nibble" and _add_norm_fit(N, K, group_size, device) is not None


def _add_norm_decode(x: torch.Tensor, residual: torch.Tensor, norm_weight, eps: float, w_packed, scale, zero_point,
                     bias, group_size: int, glu: bool):
    """``(x + residual, rms_norm(x + residual) @ W.T + bias)`` for one row: the sum, the norm and ``w4_i8mma``'s
    pieces in one launch, then ``w4_i8mma``; None where that path does not apply or failed before."""
    if not (x.shape[0] == 1 and x.dtype in (torch.float16, torch.bfloat16) and residual.dtype == x.dtype
            and norm_weight.dtype == x.dtype):
        return None
    if (fit := _add_norm_fit(w_packed.shape[0], x.shape[1], group_size, x.device)) is None:
        return None
    qt, cfg = fit

    def fused():
        s, pieces = qt.add_rms_norm_pieces(x, residual, norm_weight, eps, group_size)
        out = qt.w4_i8mma(s, w_packed, scale, w_zero=zero_point, bias=bias, group=group_size, out_dtype=x.dtype,
                          config=cfg, pieces=pieces, glu=glu)
        if out is None:
            raise RuntimeError("w4_i8mma refused the pieces of add_rms_norm_pieces")
        return s, out

    return guarded("add_rms_norm_pieces", fused, lambda: None)


def add_rms_norm_int4_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                             w_packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                             bias: torch.Tensor | None, group_size: int, layout: str, glu: bool = False):
    """A decoder layer's ``s = x + residual`` and ``int4_linear(rms_norm(s, norm_weight, eps), ...)`` (``glu``: the
    interleaved gate|up's SiLU·mul, as :func:`int4_linear`'s): ``(s, out)``. At one row where
    :func:`add_norm_decode_fits`, two launches (``quant_triton.add_rms_norm_pieces``, then ``w4_i8mma`` on those
    pieces) where the model's ops take three (Inductor's add + RMSNorm, the pieces, the product); elsewhere the
    model's ops."""
    if layout == "nibble" and (got := _add_norm_decode(_flat(x), _flat(residual), norm_weight, eps, w_packed, scale,
                                                       zero_point, bias, group_size, glu)) is not None:
        s, out = got
        return s.reshape(x.shape), out.reshape(*x.shape[:-1], out.shape[-1])
    s = residual + x
    return s, int4_linear(rms_norm(s, norm_weight, eps), w_packed, scale, zero_point, bias, group_size, layout,
                          glu=glu)
