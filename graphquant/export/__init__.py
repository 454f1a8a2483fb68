"""Emitters: the compiled graph leaves the process.

- :func:`to_hf` (``QuantizedModel.to_hf()``): the user's Hugging Face model class with
  graphquant's quantized Linear modules and online-rotation / KV-cache hooks
  (:mod:`.hf_writeback`, :mod:`.qlinear`, :mod:`.attention`);
- :func:`save_pretrained` (``QuantizedModel.save_pretrained(path, format=...)``): a
  compressed-tensors (:mod:`.compressed_tensors`) or Quark (:mod:`.quark_format`) checkpoint in
  sharded safetensors (:mod:`.shards`), written atomically into a safe folder (:mod:`.safe_output`);
- :func:`load` (``graphquant.load``): a checkpoint back into the HF model (:mod:`.load`).

All of them read :class:`.records.ModelRecords` (:mod:`.from_graph` builds them from the graph);
no pass imports this package.
"""
from .from_graph import ExportError, read_graph
from .records import AttentionRecord, LinearRecord, ModelRecords, TensorQuantizer
from .safe_output import MARKER, OutputDirError, atomic_output_dir, check_output_dir


def to_hf(qmodel, kernels: str = "never", device=None):
    """The Hugging Face model of a compiled graph (see :mod:`.hf_writeback`)."""
    from .hf_writeback import build_model

    return build_model(read_graph(qmodel), kernels=kernels, device=device)


def save_pretrained(model_or_records, path, format: str = "compressed-tensors", max_shard_size="5GB",
                    overwrite: bool = False, inputs=(), tokenizer=None, source=None) -> dict:
    from .writer import save

    return save(model_or_records, path, format=format, max_shard_size=max_shard_size, overwrite=overwrite,
                inputs=inputs, tokenizer=tokenizer, source=source)


def load(path, device=None, kernels: str = "never"):
    from .load import load as _load

    return _load(path, device=device, kernels=kernels)


__all__ = ["to_hf", "save_pretrained", "load", "read_graph", "ExportError", "ModelRecords", "LinearRecord",
           "AttentionRecord", "TensorQuantizer", "MARKER", "OutputDirError", "atomic_output_dir", "check_output_dir"]
