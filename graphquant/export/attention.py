"""Online work inside Hugging Face attention: R3 (Q, K ·Hᵀ along head_dim) and KV-cache quantizers.

Hugging Face attention modules compute Q, K, V, apply RoPE, update the KV cache and then call the
attention function registered for ``config._attn_implementation``. graphquant registers wrapping
implementations ``graphquant_sdpa`` / ``graphquant_eager`` that, for a module carrying an
``OnlineAttention`` child (``module.graphquant_online``), rotate Q and K (R3) and fake-quantize K
and V exactly where the compiled graph does (K after RoPE and R3, V as attention reads it), then
call the original implementation. Modules without it run unchanged.

K and V arrive here with the cached prefix included; re-quantizing an already quantized value
with the same static scale (or its own per-token scale) returns it unchanged, so cached
generation gives the graph's numbers without a quantized cache class.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from .qlinear import _Quantizer, _hadamard
from .records import AttentionRecord

ONLINE_ATTR = "graphquant_online"
PREFIX = "graphquant_"


class OnlineAttention(nn.Module):
    def __init__(self, rec: AttentionRecord):
        super().__init__()
        self.r3 = rec.r3
        self.k_quantizer = _Quantizer(rec.k) if rec.k is not None else None
        self.v_quantizer = _Quantizer(rec.v) if rec.v is not None else None

    def record(self) -> AttentionRecord:
        return AttentionRecord(self.r3, self.k_quantizer.record() if self.k_quantizer is not None else None,
                               self.v_quantizer.record() if self.v_quantizer is not None else None)

    def apply(self, query, key, value):
        if self.r3:
            query, key = _hadamard(query), _hadamard(key)
        if self.k_quantizer is not None:
            key = self.k_quantizer(key)
        if self.v_quantizer is not None:
            value = self.v_quantizer(value)
        return query, key, value

    def extra_repr(self) -> str:
        return f"r3={self.r3}"


def _base_function(module: nn.Module, base: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":
        mod = sys.modules.get(type(module).__module__)
        fn = getattr(mod, "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward to wrap")
        return fn
    return ALL_ATTENTION_FUNCTIONS[base]


def _make(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        online = getattr(module, ONLINE_ATTR, None)
        if online is not None:
            query, key, value = online.apply(query, key, value)
        return _base_function(module, base)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{PREFIX}{base}_attention"
    return attention


def register(base: str) -> str:
    """Register ``graphquant_<base>`` (attention and mask functions); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if base not in ("sdpa", "eager"):
        raise ValueError(f"online R3 / KV-cache quantizers wrap 'sdpa' or 'eager' attention, not {base!r}; "
                         "load the model with attn_implementation='sdpa'")
    name = f"{PREFIX}{base}"
    AttentionInterface.register(name, _make(base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def attach(model: nn.Module, records: dict[str, AttentionRecord]) -> None:
    """Give each attention module its ``OnlineAttention`` and switch the model to the wrapping
    attention implementation."""
    if not records:
        return
    for fqn, rec in records.items():
        mod = model.get_submodule(fqn)
        mod.add_module(ONLINE_ATTR, OnlineAttention(rec))
    current = model.config._attn_implementation or "sdpa"
    base = current[len(PREFIX):] if current.startswith(PREFIX) else current
    name = register(base)
    set_impl = getattr(model, "set_attn_implementation", None)
    try:
        set_impl(name)
    except Exception:  # noqa: BLE001 - older/other model classes: set the config field directly
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:
        model.config._attn_implementation = name
