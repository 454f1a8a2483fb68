"""Lowering: quantize/dequantize + Linear -> real low-precision kernels.

``graphquant.quantize(..., lower=True)`` runs the ``lower`` pass last; ``lower_model(qmodel)``
lowers an already quantized model in place. ``QuantizedModel.lowering`` reports what runs on
which kernel and what stays fake-quant, and why.

Modules: ``schemes`` (which kernel a scheme gets), ``layouts`` (weights in kernel layout),
``activation`` (activation quantization), ``ops`` (the ``graphquant::*`` custom ops), ``lower``
(the graph pass). Kernels live in ``graphquant.kernels.{int8_mm, fp8_mm, int4_mm, quant_triton}``.
"""
from .lower import LOWERED_TAG, find_sites, lower_model, lower_pass
from .schemes import KERNELS, choose

__all__ = ["LOWERED_TAG", "KERNELS", "choose", "find_sites", "lower_model", "lower_pass"]
