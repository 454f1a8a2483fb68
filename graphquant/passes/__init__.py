"""Rewrite passes. Importing this package registers the built-in passes."""
from .manager import PassContext, PassManager, register_pass, registered_passes, unregister_pass
from . import smooth, fuse_norms, rotate, online, quantize  # noqa: F401,E402  (registration)

__all__ = ["PassContext", "PassManager", "register_pass", "registered_passes", "unregister_pass"]
