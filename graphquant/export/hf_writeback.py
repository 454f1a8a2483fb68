"""HF write-back: :class:`~.records.ModelRecords` -> the user's Hugging Face model class.

The model is built from its config (``tie_word_embeddings`` as the records say), the float weights
are loaded (norm fusion, smoothing, R1, R2 are already in them), every quantized Linear becomes a
:class:`~.qlinear.QuantLinear`, LayerNorms that norm fusion made weightless become
``WeightlessRMSNorm``, and attention modules with R3 / KV-cache quantizers get an
:class:`~.attention.OnlineAttention`. It is a ``PreTrainedModel``: ``generate`` (with the KV cache
and ``attention_mask``), ``.to(device)`` and ``device_map`` work as for the original.

Nothing is left to chance: a float weight the model does not have, or a model weight no record
fills, raises :class:`~.from_graph.ExportError`.
"""
from __future__ import annotations

import inspect
import types

import torch
from torch import nn

from . import attention as A
from .from_graph import ExportError
from .qlinear import QuantLinear, WeightlessRMSNorm
from .records import ModelRecords

RECORDS_ATTR = "graphquant_notes"


def model_class(name: str):
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise ExportError(f"model class {name!r} is not in transformers; the write-back needs a transformers model")
    return cls


def _set_module(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, leaf = fqn.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def build_model(rec: ModelRecords, kernels: str = "never", device=None, dtype=None) -> nn.Module:
    """The Hugging Face model of ``rec`` (see the module docstring). ``kernels``: "never" (fake-quant,
    bit-identical to the graph), "auto" (the faster path per scheme on this device, see
    ``qlinear.CPU_FASTER``) or "always"."""
    from transformers.initialization import no_init_weights

    cls = model_class(rec.model_class)
    float_dtype = dtype or next((t.dtype for t in rec.float_weights.values() if t.is_floating_point()), torch.float32)
    kwargs = {}
    if "add_pooling_layer" in inspect.signature(cls.__init__).parameters:  # encoders built without their pooler
        kwargs["add_pooling_layer"] = any(k.startswith("pooler.") for k in rec.float_weights) or \
            any(k.startswith("pooler.") for k in rec.linears)
    with no_init_weights():
        model = cls._from_config(rec.config, dtype=float_dtype, **kwargs)
    model.eval()
    for fqn, eps in rec.rms_norms.items():
        _set_module(model, fqn, WeightlessRMSNorm(eps))
    dev = str(device or "cpu")
    for fqn, lr in rec.linears.items():
        try:
            old = model.get_submodule(fqn)
        except AttributeError:
            raise ExportError(f"{rec.model_class} has no module {fqn!r} for a quantized Linear") from None
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != lr.shape:
            raise ExportError(f"{fqn}: expected an nn.Linear of shape {lr.shape}, found {old}")
        _set_module(model, fqn, QuantLinear.from_record(lr, kernels, dev))
    _add_missing_biases(model, rec)
    expected = set(model.state_dict())
    buffers = dict(model.named_buffers())
    unexpected = sorted(set(rec.float_weights) - expected - set(buffers))
    if unexpected:
        raise ExportError(f"{len(unexpected)} rewritten weight(s) have no place in {rec.model_class}: {unexpected[:5]}")
    with torch.no_grad():
        for k in set(rec.float_weights) - expected:  # non-persistent buffers (e.g. RoPE inv_freq)
            buffers[k].copy_(rec.float_weights[k])
    result = model.load_state_dict({k: v for k, v in rec.float_weights.items() if k in expected}, strict=False)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    quant_keys = {k for k in expected if k.rsplit(".", 1)[0] in rec.linears
                  or any(k.startswith(f + ".") for f in rec.linears)}
    missing = [k for k in result.missing_keys if k not in quant_keys and not k.endswith(".graphquant_online")]
    missing = [k for k in missing if not _filled_by_tie(model, k)]
    if missing:
        raise ExportError(f"{len(missing)} weight(s) of {rec.model_class} were not written: {missing[:5]}")
    A.attach(model, rec.attention)
    model.__dict__[RECORDS_ATTR] = list(rec.notes)
    model.save_pretrained = types.MethodType(_save_pretrained, model)
    if device is not None:
        model.to(device)
    return model


def _save_pretrained(self, save_directory, format: str = "compressed-tensors", max_shard_size="5GB",
                     overwrite: bool = False, tokenizer=None, source=None, **_hf_kwargs):
    """``save_pretrained`` of a written-back model: a compressed-tensors / Quark checkpoint (HF's own
    would store graphquant's internal buffers under names no loader knows)."""
    from .writer import save

    if getattr(self, "graphquant_prepared", None):
        raise ExportError("this model was prepared for generation (graphquant.generation.prepare): its projections "
                          "are fused and it keeps only kernel weights; save the model before preparing it")
    return save(self, save_directory, format=format, max_shard_size=max_shard_size, overwrite=overwrite,
                tokenizer=tokenizer, source=source)


def _add_missing_biases(model: nn.Module, rec: ModelRecords) -> None:
    """Norm fusion folds a LayerNorm bias into Linears that had none: give those float Linears one."""
    for name, t in rec.float_weights.items():
        fqn, _, leaf = name.rpartition(".")
        if leaf != "bias":
            continue
        try:
            mod = model.get_submodule(fqn)
        except AttributeError:
            continue
        if isinstance(mod, nn.Linear) and mod.bias is None:
            mod.bias = nn.Parameter(torch.zeros(mod.out_features, dtype=t.dtype), requires_grad=False)


def _filled_by_tie(model: nn.Module, key: str) -> bool:
    """Tied output embeddings are not in the checkpoint; the model ties them itself."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return out is not None and inp is not None and out.weight is inp.weight and key.endswith("weight") and \
        model.get_submodule(key.rsplit(".", 1)[0]) is out


def records_of(model: nn.Module, base: ModelRecords | None = None) -> ModelRecords:
    """Read a written-back HF model into records again (what the checkpoint writers consume)."""
    import copy

    linears = {n: m.record() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    attention = {n: getattr(m, A.ONLINE_ATTR).record() for n, m in model.named_modules()
                 if isinstance(getattr(m, A.ONLINE_ATTR, None), A.OnlineAttention)}
    rms = {n: m.eps for n, m in model.named_modules() if isinstance(m, WeightlessRMSNorm)}
    skip = tuple(f"{n}." for n in linears) + tuple(f"{n}.{A.ONLINE_ATTR}." for n in attention)
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        out_name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        sd.pop(f"{out_name}.weight", None)
    weights = {k: v for k, v in sd.items() if not k.startswith(skip)}
    config = copy.deepcopy(model.config)
    if config._attn_implementation and config._attn_implementation.startswith(A.PREFIX):
        config._attn_implementation = config._attn_implementation[len(A.PREFIX):]
    return ModelRecords(type(model).__name__, config, weights, linears, attention, rms,
                        list(model.__dict__.get(RECORDS_ATTR, [])))
