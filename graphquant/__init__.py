"""graphquant: a torch.export graph-transformation compiler for post-training quantization of LLMs."""
from .api import analyze
from .capture import CapturedGraph, capture
from .errors import (CalibrationError, CaptureError, CheckpointError, ConfigError, EquivalenceError, GraphQuantError,
                     PassError, UnsupportedHadamardSize, UnsupportedModelError)
from .patterns import Pattern, PatternReport, register_pattern

__version__ = "0.1.0"

__all__ = ["analyze", "capture", "CapturedGraph", "Pattern", "PatternReport", "register_pattern",
           "GraphQuantError", "CaptureError", "UnsupportedModelError", "ConfigError", "UnsupportedHadamardSize",
           "CalibrationError", "EquivalenceError", "PassError", "CheckpointError"]
