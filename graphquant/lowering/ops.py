"""``torch.library`` custom ops of lowered graphs (namespace ``graphquant``).

Schemas::

    graphquant::quantize_act_dynamic(Tensor x, str spec, bool hadamard=False) -> (Tensor codes, Tensor scale)
    graphquant::quantize_act_static(Tensor x, Tensor scale, str spec, bool hadamard=False) -> Tensor codes
    graphquant::int8_linear(Tensor xq, Tensor x_scale, Tensor w, Tensor w_scale, Tensor? bias,
                            ScalarType out_dtype, bool glu=False) -> Tensor
    graphquant::fp8_linear(Tensor xq, Tensor x_scale, Tensor w, Tensor w_scale, Tensor? bias,
                           ScalarType out_dtype, bool glu=False) -> Tensor
    graphquant::int8_weight_only_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, bool glu=False) -> Tensor
    graphquant::int4_linear(Tensor x, Tensor w_packed, Tensor scale, Tensor? zero_point, Tensor? bias,
                            int group_size, str layout, bool hadamard=False, bool gated=False,
                            bool glu=False) -> Tensor
    graphquant::add_rms_norm_int4_linear(Tensor x, Tensor residual, Tensor norm_weight, float eps,
                                         Tensor w_packed, Tensor scale, Tensor? zero_point, Tensor? bias,
                                         int group_size, str layout, bool glu=False) -> (Tensor sum, Tensor out)

Activation quantization is its own op so that one quantizer feeding several Linears (q/k/v,
gate/up) runs once. ``spec`` is ``QuantizationSpec.to_op_str()``. Codes are int8 or
float8_e4m3fn with ``x``'s shape; dynamic scales are fp32, ``x.shape[:-1] + (1,)`` per token or
``()`` per tensor. Linear outputs are ``x.shape[:-1] + (N,)``; ``int4_linear``'s ``gated``: ``x`` is a
gated MLP's gate|up pair (``2 K`` wide) and the product is of ``silu(gate) * up`` (``int4_mm.silu_mul``).
``glu`` (every linear op): ``w`` is a fused gate|up weight with its rows interleaved in ``int8_mm.GLU_BLOCK``
blocks and the op returns ``silu(gate) * up`` (``N / 2`` wide, ``int8_mm.interleaved_glu``), which a decode
kernel computes in its own epilogue (``quant_triton.decode_mm(..., glu=True)``). ``add_rms_norm_int4_linear`` is a
decoder layer's residual add, its RMSNorm (Hugging Face's) and an ``int4_linear`` of the normalized rows: the sum
and the product (``int4_mm.add_rms_norm_int4_linear``: one launch before the product at decode).
Every op has a fake kernel, so lowered graphs trace under ``torch.export`` and ``torch.compile`` (where they
stay opaque calls into the kernels). Implementations: ``graphquant.lowering.activation`` and
``graphquant.kernels.{int8_mm, fp8_mm, int4_mm}``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels import fp8_mm, int4_mm, int8_mm
from . import activation as act

__all__ = ["quantize_act_dynamic", "quantize_act_static", "int8_linear", "fp8_linear", "int8_weight_only_linear",
           "int4_linear", "add_rms_norm_int4_linear"]


@torch.library.custom_op("graphquant::quantize_act_dynamic", mutates_args=())
def quantize_act_dynamic(x: torch.Tensor, spec: str, hadamard: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = act.quantize_dynamic(x, spec, hadamard)
    return q, s


@quantize_act_dynamic.register_fake
def _(x, spec, hadamard=False):
    return (torch.empty_like(x, dtype=act.codes_dtype(spec)),
            x.new_empty(act.scale_shape(x.shape, spec), dtype=torch.float32))


@torch.library.custom_op("graphquant::quantize_act_static", mutates_args=())
def quantize_act_static(x: torch.Tensor, scale: torch.Tensor, spec: str, hadamard: bool = False) -> torch.Tensor:
    return act.quantize_static(x, scale, spec, hadamard)


@quantize_act_static.register_fake
def _(x, scale, spec, hadamard=False):
    return torch.empty_like(x, dtype=act.codes_dtype(spec))


def _linear_fake(x, n: int, dtype):
    return x.new_empty((*x.shape[:-1], n), dtype=dtype)


@torch.library.custom_op("graphquant::int8_linear", mutates_args=())
def int8_linear(xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor], out_dtype: torch.dtype, glu: bool = False) -> torch.Tensor:
    return int8_mm.int8_linear(xq, x_scale, w, w_scale, bias, out_dtype, glu)


@int8_linear.register_fake
def _(xq, x_scale, w, w_scale, bias, out_dtype, glu=False):
    return _linear_fake(xq, w.shape[0] // (2 if glu else 1), out_dtype)


@torch.library.custom_op("graphquant::fp8_linear", mutates_args=())
def fp8_linear(xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
               bias: Optional[torch.Tensor], out_dtype: torch.dtype, glu: bool = False) -> torch.Tensor:
    return fp8_mm.fp8_linear(xq, x_scale, w, w_scale, bias, out_dtype, glu)


@fp8_linear.register_fake
def _(xq, x_scale, w, w_scale, bias, out_dtype, glu=False):
    return _linear_fake(xq, w.shape[0] // (2 if glu else 1), out_dtype)


@torch.library.custom_op("graphquant::int8_weight_only_linear", mutates_args=())
def int8_weight_only_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                            bias: Optional[torch.Tensor], glu: bool = False) -> torch.Tensor:
    return int8_mm.int8_weight_only_linear(x, w, w_scale, bias, glu)


@int8_weight_only_linear.register_fake
def _(x, w, w_scale, bias, glu=False):
    return _linear_fake(x, w.shape[0] // (2 if glu else 1), x.dtype)


@torch.library.custom_op("graphquant::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, w_packed: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], group_size: int, layout: str, hadamard: bool = False,
                gated: bool = False, glu: bool = False) -> torch.Tensor:
    return int4_mm.int4_linear(x, w_packed, scale, zero_point, bias, group_size, layout, hadamard, gated, glu)


@int4_linear.register_fake
def _(x, w_packed, scale, zero_point, bias, group_size, layout, hadamard=False, gated=False, glu=False):
    return _linear_fake(x, w_packed.shape[0] // (2 if glu else 1), x.dtype)


@torch.library.custom_op("graphquant::add_rms_norm_int4_linear", mutates_args=())
def add_rms_norm_int4_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                             w_packed: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], group_size: int, layout: str,
                             glu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return int4_mm.add_rms_norm_int4_linear(x, residual, norm_weight, eps, w_packed, scale, zero_point, bias,
                                            group_size, layout, glu)


@add_rms_norm_int4_linear.register_fake
def _(x, residual, norm_weight, eps, w_packed, scale, zero_point, bias, group_size, layout, glu=False):
    return torch.empty_like(x), _linear_fake(x, w_packed.shape[0] // (2 if glu else 1), x.dtype)
