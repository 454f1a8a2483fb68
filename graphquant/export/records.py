"""What an emitter needs to know about a quantized model, in one place and in format-neutral form.

``ModelRecords`` is built either from a compiled graph (:func:`graphquant.export.from_graph.read_graph`)
or from a checkpoint on disk (:mod:`graphquant.export.load`), and is what the HF write-back
(:mod:`.hf_writeback`) and the checkpoint writers (:mod:`.compressed_tensors`, :mod:`.quark_format`)
consume. Nothing here refers to graph nodes.

Tensors are kept as graphquant stores them (``graphquant.quant.fake_quant``): weight codes one per
element in their storage dtype (int8 / uint8 / float8), scales float32 in ``qparam_shape``
(per-tensor ``()``, per-channel ``(N,)``, per-group ``(N, ceil(K / group))``), zero points int32
or ``None`` where the scheme has none (symmetric signed ints, floats).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import QuantizationSpec


@dataclass
class TensorQuantizer:
    """An activation quantizer: ``spec`` plus its calibrated qparams (``None`` when dynamic)."""

    spec: QuantizationSpec
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    #: ``SinkTokenConfig``: the first ``sink_tokens`` positions of a prefill are quantized per token
    #: (``sink_mode="dynamic"``) or kept in float (``"float"``) instead of with the static scale.
    sink_tokens: int = 0
    sink_mode: str = "dynamic"

    @property
    def dynamic(self) -> bool:
        return self.scale is None


@dataclass
class LinearRecord:
    """One quantized Linear: weight codes and qparams, bias, and what runs on its input / output."""

    weight: torch.Tensor  # (out, in) codes in storage dtype
    weight_spec: QuantizationSpec
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor | None
    bias: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32  # compute dtype of the float model
    input: TensorQuantizer | None = None
    output: TensorQuantizer | None = None
    input_rotation: str | None = None  # "hadamard": online R4, x -> x·Hᵀ before the input quantizer

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


@dataclass
class AttentionRecord:
    """Online work at one attention module: R3 (Q and K ·Hᵀ along head_dim, after RoPE) and the
    KV-cache quantizers (K after R3, V as attention reads it)."""

    r3: bool = False
    k: TensorQuantizer | None = None
    v: TensorQuantizer | None = None


@dataclass
class ModelRecords:
    model_class: str
    config: Any  # the Hugging Face config (a copy; tie_word_embeddings adjusted)
    float_weights: dict[str, torch.Tensor]  # HF state-dict names of everything not quantized
    linears: dict[str, LinearRecord] = field(default_factory=dict)
    attention: dict[str, AttentionRecord] = field(default_factory=dict)
    rms_norms: dict[str, float] = field(default_factory=dict)  # LayerNorm fqn -> eps, now weightless RMSNorm
    notes: list[str] = field(default_factory=list)  # what differs from the original model, in words

    @property
    def online_rotations(self) -> dict[str, list[str]]:
        """{"R4": [linear fqns], "R3": [attention fqns]}"""
        return {"R4": [k for k, r in self.linears.items() if r.input_rotation],
                "R3": [k for k, a in self.attention.items() if a.r3]}
