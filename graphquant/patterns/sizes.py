"""Hadamard feasibility of a rotation size, as the report shows it."""
from __future__ import annotations


def hadamard_info(n) -> dict:
    """``{"size", "supported", "factorization" ("m·2^k"), "m", "k", "reason"}`` for order ``n``."""
    from ..errors import UnsupportedHadamardSize

    try:
        from .. import hadamard
    except ImportError as e:  # pragma: no cover - only while the package is half-installed
        return {"size": n, "supported": False, "factorization": None, "m": None, "k": None, "reason": str(e)}

    try:
        n = int(n)
    except (TypeError, ValueError):
        return {"size": str(n), "supported": False, "factorization": None, "m": None, "k": None,
                "reason": "size is not static"}
    try:
        m, k = hadamard.factorize(n)
    except UnsupportedHadamardSize as e:
        return {"size": n, "supported": False, "factorization": None, "m": None, "k": None,
                "reason": str(e).splitlines()[0]}
    return {"size": n, "supported": True, "factorization": f"{m}·2^{k}", "m": m, "k": k, "reason": ""}
