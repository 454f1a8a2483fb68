"""``save``: a quantized model -> a checkpoint folder in compressed-tensors or Quark format.

One function for every entry point (``QuantizedModel.save_pretrained``, the CLI's
``--output_dir``): records are read (from the graph, or from a written-back HF model), the
format module turns them into tensors and a ``quantization_config``, and everything is written
into a safe, atomically replaced folder (:mod:`.safe_output`) with ``config.json``, the
tokenizer, the generation config and ``graphquant_export.json`` (graphquant's exact specs, the
notes, and the caveats: which consumer ignores what).
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from torch import nn

from .from_graph import ExportError, read_graph
from .records import ModelRecords
from .safe_output import atomic_output_dir
from .shards import write_sharded

BUFFERS = "graphquant_buffers.safetensors"
FORMATS = {"compressed-tensors": "compressed-tensors", "compressed_tensors": "compressed-tensors",
           "quark": "quark", "hf_format": "quark"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def format_name(fmt: str) -> str:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ExportError(f"unknown checkpoint format {fmt!r}; choose compressed-tensors, quark or hf_format "
                          "(an alias of quark)") from None


def _format_module(fmt: str):
    if fmt == "quark":
        from . import quark_format

        return quark_format
    from . import compressed_tensors

    return compressed_tensors


def as_records(obj) -> ModelRecords:
    if isinstance(obj, ModelRecords):
        return obj
    if hasattr(obj, "captured") and hasattr(obj, "gm"):
        return read_graph(obj)
    if isinstance(obj, nn.Module) and hasattr(obj, "config"):
        from .hf_writeback import records_of

        return records_of(obj)
    raise ExportError(f"cannot save a {type(obj).__name__}: pass a graphquant QuantizedModel or its to_hf() model")


def gq_specs(rec: ModelRecords) -> dict:
    """graphquant's exact numerics per module (restored by graphquant.load)."""
    out = {}
    for fqn, lr in rec.linears.items():
        out[fqn] = {"weight": lr.weight_spec.to_op_str()}
        for role in ("input", "output"):
            q = getattr(lr, role)
            if q is not None:
                out[fqn][role] = q.spec.to_op_str()
                if q.sink_tokens:
                    out[fqn][f"{role}_sink"] = [q.sink_tokens, q.sink_mode]
    for fqn, a in rec.attention.items():
        if a.k is not None:
            out.setdefault(fqn, {})["kv"] = a.k.spec.to_op_str()
        for role in ("k", "v"):
            q = getattr(a, role)
            if q is not None and q.sink_tokens:
                out.setdefault(fqn, {})[f"{role}_sink"] = [q.sink_tokens, q.sink_mode]
    return out


def sink_token_caveat(rec: ModelRecords) -> list[str]:
    """``SinkTokenConfig`` is graphquant's own: no checkpoint format can say it."""
    qs = [q for lr in rec.linears.values() for q in (lr.input, lr.output) if q is not None]
    qs += [q for a in rec.attention.values() for q in (a.k, a.v) if q is not None]
    sink = [q for q in qs if q.sink_tokens]
    if not sink:
        return []
    return [f"sink tokens: graphquant quantizes the first {sink[0].sink_tokens} token(s) of a prefill "
            f"{'per token' if sink[0].sink_mode == 'dynamic' else 'in float'} at {len(sink)} static activation "
            "quantizer(s) (SinkTokenConfig); the format stores only the static scale, so transformers and vLLM apply "
            "it to every token and clip the attention-sink token: their results DIFFER from graphquant's "
            "(graphquant.load restores the sink handling)"]


def restore_sink_tokens(linears: dict, attention: dict, specs: dict) -> None:
    """Put the sink-token handling that ``gq_specs`` recorded back on the quantizers read from a checkpoint."""
    for fqn, s in specs.items():
        for role, holder in (("input", linears.get(fqn)), ("output", linears.get(fqn)),
                             ("k", attention.get(fqn)), ("v", attention.get(fqn))):
            q = getattr(holder, role, None) if holder is not None else None
            if q is not None and f"{role}_sink" in s:
                q.sink_tokens, q.sink_mode = int(s[f"{role}_sink"][0]), str(s[f"{role}_sink"][1])


def save(obj, path, format: str = "compressed-tensors", max_shard_size="5GB", overwrite: bool = False, inputs=(),
         tokenizer=None, source=None) -> dict:
    """Write ``obj`` (a ``QuantizedModel``, its ``to_hf()`` model, or ``ModelRecords``) to ``path``;
    returns the contents of ``graphquant_export.json``."""
    from .. import __version__
    from .hf_writeback import build_model

    fmt = format_name(format)
    rec = as_records(obj)
    mod = _format_module(fmt)
    skeleton = build_model(rec)  # module names and types of the HF model
    float_linears = [n for n, m in skeleton.named_modules() if type(m) is nn.Linear]
    qc = mod.quantization_config(rec, float_linears)
    tensors = mod.tensors(rec)
    persistent = set(skeleton.state_dict())
    side = {}  # non-persistent buffers (RoPE inv_freq): loaders rebuild them, graphquant.load restores them
    for k in [k for k in rec.float_weights if k not in persistent]:
        side[k] = tensors.pop(k).detach().contiguous()
    for fqn in rec.rms_norms:  # a LayerNorm with weight 1 / bias 0 equals the weightless RMSNorm on the
        norm = skeleton.get_submodule(fqn)  # centered residual stream: plain consumers stay right
        for pname, p in norm.named_parameters(recurse=False):
            tensors[f"{fqn}.{pname}"] = torch.ones_like(p) if pname == "weight" else torch.zeros_like(p)
    out_emb = skeleton.get_output_embeddings() if hasattr(skeleton, "get_output_embeddings") else None
    if getattr(rec.config, "tie_word_embeddings", False) and out_emb is not None:
        name = next(n for n, m in skeleton.named_modules() if m is out_emb)
        tensors.pop(f"{name}.weight", None)
    caveats = mod.caveats(rec) + sink_token_caveat(rec)
    marker = {"graphquant_version": __version__, "format": fmt, "model_class": rec.model_class,
              "notes": list(rec.notes), "caveats": caveats, "specs": gq_specs(rec),
              "online_rotations": rec.online_rotations, "rms_norms": dict(rec.rms_norms)}
    with atomic_output_dir(path, inputs=inputs, overwrite=overwrite, marker=marker) as tmp:
        write_sharded(tensors, tmp, max_shard_size)
        if side:
            from safetensors.torch import save_file

            save_file(side, str(tmp / BUFFERS))
        cfg = copy.deepcopy(rec.config)
        cfg.architectures = [rec.model_class]
        cfg.quantization_config = qc
        cfg.save_pretrained(str(tmp))
        _copy_side_files(tmp, rec, tokenizer, source)
    return marker


def _copy_side_files(tmp: Path, rec: ModelRecords, tokenizer, source) -> None:
    src = Path(source) if source else None
    if src is not None and src.is_file():
        src = src.parent
    if src is not None and src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(tmp))
    if not (tmp / "generation_config.json").exists():
        try:
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(rec.config).save_pretrained(str(tmp))
        except Exception:  # noqa: BLE001 - a model without generation settings (encoders)
            pass
