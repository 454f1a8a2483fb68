"""Memory budgets in accelerate's ``max_memory`` convention, and process memory measurements.

``parse_max_memory("cuda=8GiB,cpu=16GiB")`` or ``parse_max_memory({0: "8GiB", "cpu": "16GiB"})``
gives ``{"cuda:0": bytes, "cpu": bytes}``. Keys follow accelerate's ``max_memory``: a GPU index
(``0``), ``"cuda"`` (= ``cuda:0``), ``"cuda:N"``, ``"cpu"``, ``"mps"``, ``"disk"``; sizes are bytes
or strings with the units accelerate reads (``"8GiB"``, ``"8GB"``, ``"500MB"``, ``"512MiB"``, ``"2KB"``:
GB and MB are powers of ten, GiB and MiB powers of two).
"""
from __future__ import annotations

import re

from .errors import ConfigError

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_EXAMPLE = "e.g. 'cuda=8GiB,cpu=16GiB' or {0: '8GiB', 'cpu': '16GiB'}"


def parse_size(size, what: str = "memory size") -> int:
    """``"8GiB"`` / ``"500MB"`` / ``1024`` -> bytes (``what`` names the value in error messages)."""
    if isinstance(size, bool):
        raise ConfigError(f"{what} {size!r} is not a size; use bytes or a string such as '8GiB'")
    if isinstance(size, (int, float)):
        if size <= 0:
            raise ConfigError(f"{what} must be positive, got {size}")
        return int(size)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise ConfigError(f"{what} {size!r} not understood; use bytes or e.g. '8GiB', '5GB', '500MiB'")
    value = float(m.group(1)) * _UNITS[m.group(2) or "B"]
    if value <= 0:
        raise ConfigError(f"{what} must be positive, got {size!r}")
    return int(value)


def _device_key(key) -> str:
    if isinstance(key, bool):
        raise ConfigError(f"max_memory key {key!r} is not a device; {_EXAMPLE}")
    if isinstance(key, int):
        return f"cuda:{key}"
    k = str(key).strip().lower()
    if k.isdigit():
        return f"cuda:{k}"
    if k == "cuda" or k == "gpu":
        return "cuda:0"
    if re.fullmatch(r"cuda:\d+", k) or k in ("cpu", "mps", "disk"):
        return k
    raise ConfigError(f"max_memory key {key!r} is not a device (cpu, cuda, cuda:N, a GPU index, mps, disk); {_EXAMPLE}")


def parse_max_memory(spec) -> dict[str, int]:
    """A ``max_memory`` budget (string ``"cuda=8GiB,cpu=16GiB"`` or accelerate's dict) -> ``{device: bytes}``."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        items = {}
        for part in [p for p in spec.split(",") if p.strip()]:
            if "=" not in part:
                raise ConfigError(f"max_memory entry {part.strip()!r} has no '='; {_EXAMPLE}")
            k, v = part.split("=", 1)
            if k.strip() in items:
                raise ConfigError(f"max_memory names {k.strip()} twice; {_EXAMPLE}")
            items[k.strip()] = v.strip()
        if not items:
            raise ConfigError(f"max_memory {spec!r} is empty; {_EXAMPLE}")
        spec = items
    if not isinstance(spec, dict):
        raise ConfigError(f"max_memory must be a string or a dict, got {type(spec).__name__}; {_EXAMPLE}")
    out: dict[str, int] = {}
    for k, v in spec.items():
        dev = _device_key(k)
        if dev in out:
            raise ConfigError(f"max_memory names {dev} twice; {_EXAMPLE}")
        out[dev] = parse_size(v)
    return out


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc``; else the peak as a stand-in)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (since the start, or since :func:`reset_peak_rss`)."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_rss() -> bool:
    """Start a new peak RSS measurement (Linux ``/proc/self/clear_refs``); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
