"""Every error graphquant raises on purpose derives from :class:`GraphQuantError`.

Each message says what went wrong and what to do about it.
"""
from __future__ import annotations


class GraphQuantError(Exception):
    """Base class of graphquant's errors."""


class CaptureError(GraphQuantError):
    """``torch.export`` could not capture the model."""


class UnsupportedModelError(GraphQuantError):
    """The object is not a model graphquant can work on (not an ``nn.Module``, no Linear, ...)."""


class ConfigError(GraphQuantError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class UnsupportedHadamardSize(GraphQuantError, ValueError):
    """No Hadamard matrix of the requested order can be built."""


class CalibrationError(GraphQuantError, ValueError):
    """Calibration data is empty, malformed or produces non-finite activations."""


class EquivalenceError(GraphQuantError):
    """An offline rewrite changed the float model's function."""


class PassError(GraphQuantError):
    """A rewrite pass is mis-registered (unknown name, ordering cycle) or failed."""


class NonFiniteError(GraphQuantError, ValueError):
    """The model's weights or outputs contain NaN or Inf (a damaged checkpoint, an overflow)."""


class CheckpointError(GraphQuantError):
    """A checkpoint file is missing, truncated or corrupt."""
