"""graphquant's log: the ``"graphquant"`` logger, set from ``Config.log_severity_level``.

Levels follow Quark's (and ONNX Runtime's) ``log_severity_level``: 0 verbose (DEBUG), 1 info
(default), 2 warning, 3 error, 4 fatal; ``quantize`` sets the logger's level from its config. When the
application has not configured logging (no handler on the root or ``graphquant`` logger), messages go
to stderr as ``graphquant: <message>``; handlers the application installed are used as they are.
"""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("graphquant")

SEVERITY_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR, 4: logging.CRITICAL}
_HANDLER_TAG = "_graphquant_default_handler"


class _StderrHandler(logging.StreamHandler):
    """Writes to the *current* ``sys.stderr`` (so redirections and test capture see it)."""

    def __init__(self):
        super().__init__()
        setattr(self, _HANDLER_TAG, True)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def set_severity(level: int | None) -> None:
    """Set the ``graphquant`` logger's level from a Quark-style severity (0..4); ``None`` leaves it."""
    if level is None:
        return
    logger.setLevel(SEVERITY_LEVELS.get(int(level), logging.DEBUG if level < 0 else logging.CRITICAL))
    if not logger.handlers and not logging.getLogger().handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("graphquant: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
