"""``graphquant.load(path)``: a compressed-tensors or Quark checkpoint -> the HF write-back model.

Reads ``config.json`` (its ``quantization_config`` says the format), the sharded safetensors and,
when graphquant wrote the folder, ``graphquant_export.json`` (the exact specs and the LayerNorms
norm fusion made weightless). Every online transform the checkpoint carries (R4 at Linear inputs,
R3 at attention) is applied by the returned model.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from .from_graph import ExportError
from .records import ModelRecords
from .safe_output import MARKER
from .shards import read_sharded
from .writer import BUFFERS, restore_sink_tokens


def load(path, device=None, kernels: str = "never"):
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    from .hf_writeback import build_model, model_class

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ExportError(f"{path}: no config.json; graphquant.load reads a folder written by "
                          "QuantizedModel.save_pretrained / graphquant quantize --output_dir")
    config = AutoConfig.from_pretrained(str(folder))
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    marker = json.loads((folder / MARKER).read_text()) if (folder / MARKER).is_file() else {}
    plain = copy.deepcopy(config)
    if hasattr(plain, "quantization_config"):
        del plain.quantization_config
    arch = (config.architectures or [None])[0]
    if arch is None:
        raise ExportError(f"{path}: config.json names no architecture")
    with no_init_weights():
        skeleton = model_class(arch)(copy.deepcopy(plain))
    tensors = read_sharded(folder)
    specs = marker.get("specs", {})
    method = (qc or {}).get("quant_method")
    if method == "compressed-tensors":
        from . import compressed_tensors as fmt
    elif method == "quark":
        from . import quark_format as fmt
    elif qc is None:
        fmt = None
    else:
        raise ExportError(f"{path}: quant_method {method!r} is not one graphquant reads (compressed-tensors, quark)")
    if fmt is not None:
        linears, attention, weights = fmt.read(qc, tensors, skeleton, specs)
        restore_sink_tokens(linears, attention, specs)
    else:
        linears, attention, weights = {}, {}, tensors
    float_dtype = _float_dtype(skeleton, weights, config)
    for lr in linears.values():  # the compute dtype of the saved model, not the skeleton's default
        lr.dtype = float_dtype
    if (folder / BUFFERS).is_file():  # the exact non-persistent buffers of the saved model
        from safetensors.torch import load_file

        weights.update(load_file(str(folder / BUFFERS)))
    rms = {k: float(v) for k, v in marker.get("rms_norms", {}).items()}
    weights = {k: v for k, v in weights.items() if k.rsplit(".", 1)[0] not in rms}
    rec = ModelRecords(arch, plain, weights, linears, attention, rms, list(marker.get("notes", [])))
    return build_model(rec, kernels=kernels, device=device, dtype=float_dtype)


def _float_dtype(skeleton, weights: dict, config):
    import torch

    emb = skeleton.get_input_embeddings() if hasattr(skeleton, "get_input_embeddings") else None
    name = next((n for n, m in skeleton.named_modules() if m is emb), None) if emb is not None else None
    t = weights.get(f"{name}.weight") if name is not None else None
    if t is not None and t.is_floating_point():
        return t.dtype
    d = getattr(config, "dtype", None)
    return d if isinstance(d, torch.dtype) else torch.float32
