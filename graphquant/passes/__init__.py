"""Rewrite passes. Importing this package registers the built-in passes."""
from .manager import PassContext, PassManager, pass_scope, register_pass, registered_passes, unregister_pass
from . import smooth, fuse_norms, rotate, online, quantize, gptq, awq, auto_smooth, sink_tokens  # noqa: F401,E402  (registration)
from ..lowering import lower as _lower  # noqa: F401,E402  (registers the "lower" pass)

__all__ = ["PassContext", "PassManager", "register_pass", "pass_scope", "registered_passes", "unregister_pass"]
