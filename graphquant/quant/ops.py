"""``torch.library`` custom ops for quantization, so quantized graphs export and compile.

Schemas (namespace ``graphquant``; other modules add their own ops to it)::

    graphquant::quantize(Tensor x, Tensor scale, Tensor zero_point, str spec) -> Tensor
    graphquant::dequantize(Tensor q, Tensor scale, Tensor? zero_point, str spec,
                           ScalarType out_dtype=float32) -> Tensor
    graphquant::fake_quant(Tensor x, Tensor scale, Tensor zero_point, str spec) -> Tensor
    graphquant::dynamic_fake_quant(Tensor x, str spec) -> Tensor

``spec`` is ``QuantizationSpec.to_op_str()`` (parsed once and cached). Output dtypes:
``quantize`` → ``storage_dtype(spec)``; ``dequantize`` → ``out_dtype``; the fake-quant ops →
``x.dtype``. Shapes equal the input's. ``dequantize`` takes ``zero_point=None`` for schemes without
one (symmetric signed ints, floats). Fake (meta) kernels compute exactly that, so the ops trace
under ``torch.export`` (with dynamic dims) and ``torch.compile``. Outputs never alias inputs.

Call them as ``torch.ops.graphquant.fake_quant(x, scale, zp, spec_str)`` or through the Python
handles below (``ops.fake_quant(...)``).

The two fake-quant ops have a straight-through gradient (``d out / d x = 1``; none for scale and
zero point), so gradient-based code can run through a fake-quantized graph.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import fake_quant as FQ

__all__ = ["quantize", "dequantize", "fake_quant", "dynamic_fake_quant"]


def _fresh(out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """``out``, copied if it shares memory with an input (custom ops must not alias)."""
    ptr = out.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == ptr for t in inputs):
        return out.clone()
    return out


@torch.library.custom_op("graphquant::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: str) -> torch.Tensor:
    return _fresh(FQ.quantize(x, scale, zero_point, spec), x)


@quantize.register_fake
def _(x, scale, zero_point, spec):
    return torch.empty_like(x, dtype=FQ.storage_dtype(spec))


@torch.library.custom_op("graphquant::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], spec: str,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return _fresh(FQ.dequantize(q, scale, zero_point, spec, out_dtype), q)


@dequantize.register_fake
def _(q, scale, zero_point, spec, out_dtype=torch.float32):
    return torch.empty_like(q, dtype=out_dtype)


@torch.library.custom_op("graphquant::fake_quant", mutates_args=())
def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: str) -> torch.Tensor:
    return _fresh(FQ.fake_quantize(x, scale, zero_point, spec), x)


@fake_quant.register_fake
def _(x, scale, zero_point, spec):
    return torch.empty_like(x)


@torch.library.custom_op("graphquant::dynamic_fake_quant", mutates_args=())
def dynamic_fake_quant(x: torch.Tensor, spec: str) -> torch.Tensor:
    return _fresh(FQ.dynamic_fake_quantize(x, spec), x)


@dynamic_fake_quant.register_fake
def _(x, spec):
    return torch.empty_like(x)


def _straight_through(ctx, grad):
    return (grad,) + (None,) * ctx.n_other


def _setup_st(n_other):
    def setup(ctx, inputs, output):
        ctx.n_other = n_other
    return setup


fake_quant.register_autograd(_straight_through, setup_context=_setup_st(3))
dynamic_fake_quant.register_autograd(_straight_through, setup_context=_setup_st(1))
