"""graphquant: a torch.export graph-transformation compiler for post-training quantization of LLMs."""
from . import config, eval, hadamard  # noqa: A004  (gq.eval.perplexity is public)
from .api import ModelQuantizer, analyze, quantize, rewrite
from .capture import CapturedGraph, capture
from .export import load
from .errors import (CalibrationError, CaptureError, CheckpointError, ConfigError, EquivalenceError, GraphQuantError,
                     NonFiniteError, PassError, UnsupportedHadamardSize, UnsupportedModelError)
from .graph_model import GraphModel, QuantizedModel
from .passes import PassContext, PassManager, pass_scope, register_pass
from .patterns import Pattern, PatternReport, register_pattern
from .stream import meta_model, quantize_streamed

__version__ = "0.1.0"

__all__ = ["load", "analyze", "rewrite", "quantize", "ModelQuantizer", "QuantizedModel", "config", "eval", "hadamard", "GraphModel", "PassContext", "PassManager", "register_pass", "pass_scope", "capture", "CapturedGraph", "Pattern", "PatternReport", "register_pattern",
           "GraphQuantError", "CaptureError", "UnsupportedModelError", "ConfigError", "UnsupportedHadamardSize",
           "CalibrationError", "EquivalenceError", "NonFiniteError", "PassError", "CheckpointError"]
__all__ += ["quantize_streamed", "meta_model"]
