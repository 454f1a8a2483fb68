"""Models larger than memory: capture on the meta device, quantize one decoder layer at a time with
weights streamed from the safetensors shards, and write the checkpoint as it goes.

- :func:`meta_model` (:mod:`.checkpoint`): a checkpoint folder's model with no weights (analysis and
  plans need none: ``graphquant.analyze(meta_model(path))``);
- :func:`quantize_streamed` (:mod:`.pipeline`): the pipeline unit by unit (:mod:`.units`), writing the
  checkpoint incrementally (:mod:`.writer`) under a ``max_memory`` budget (:mod:`graphquant.memory`).
"""
from .checkpoint import CheckpointWeights, meta_model
from .pipeline import StreamResult, quantize_streamed

__all__ = ["meta_model", "quantize_streamed", "StreamResult", "CheckpointWeights"]
