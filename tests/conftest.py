"""Shared fixtures: the shared data folder, and a session cache of tiny models and their analyses.

Capturing a model with ``torch.export`` is the slow part of most tests (about a second for a
2-layer tiny model), so each (architecture, layers) pair is captured and analysed once per session.
Tests must not modify cached models or graphs: copy them first.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent


def _shared_dir() -> Path | None:
    env = os.environ.get("GRAPHQUANT_SHARED")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared")
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` next to the repository (or ``$GRAPHQUANT_SHARED``); skips the test when absent."""
    d = _shared_dir()
    if d is None:
        pytest.skip("shared data folder not found (set GRAPHQUANT_SHARED or put it at ../shared)")
    return d


def run_in_triton_interpreter(script: str, timeout: float = 900) -> str:
    """``script`` run by a fresh Python with ``TRITON_INTERPRET=1`` (Triton kernels on CPU tensors; the env var
    must be set before Triton is imported, hence the subprocess; the tests folder is importable there, for shared
    helpers such as ``w4a16_cases``); skips without Triton, fails with the script's output unless it exits 0;
    returns its stdout."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join((str(REPO_ROOT), str(TESTS_DIR)))}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout


def hadamard_module():
    """``graphquant.hadamard`` when it is importable, else None."""
    if importlib.util.find_spec("graphquant.hadamard") is None:
        return None
    try:
        from graphquant import hadamard
    except ImportError:
        return None
    return hadamard


def check_factorization(info: dict, n: int) -> str:
    """Check a report's Hadamard record for order ``n`` against ``graphquant.hadamard`` and return the
    ``"m·2^k"`` text. Uses only the public ``is_supported``; the factorization must multiply back to n."""
    had = hadamard_module()
    assert info["size"] == n
    assert info["supported"] is bool(had.is_supported(n)), info
    if not info["supported"]:
        assert info["reason"]
        return "none"
    m = re.fullmatch(r"(\d+)·2\^(\d+)", info["factorization"])
    assert m, info
    assert int(m.group(1)) * 2 ** int(m.group(2)) == n
    return info["factorization"]


@dataclass
class Analysed:
    model: torch.nn.Module
    report: "object"  # graphquant.PatternReport

    @property
    def captured(self):
        return self.report.context.captured


class _Cache:
    def __init__(self):
        self._store: dict[tuple, Analysed] = {}

    def __call__(self, arch: str, num_layers: int = 2) -> Analysed:
        key = (arch, num_layers)
        if key not in self._store:
            import graphquant as gq
            from graphquant.models.tiny import tiny_model

            model = tiny_model(arch, num_layers=num_layers)
            self._store[key] = Analysed(model, gq.analyze(model))
        return self._store[key]


@pytest.fixture(scope="session")
def tiny_analysis():
    """``tiny_analysis(arch, num_layers=2) -> Analysed(model, report)``, cached for the session."""
    return _Cache()


@pytest.fixture(scope="session")
def tiny_saved_llama(tmp_path_factory) -> Path:
    """A 2-layer tiny Llama written with ``save_pretrained`` (for the CLI)."""
    from graphquant.models.tiny import tiny_model

    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama").save_pretrained(folder)
    return folder


@pytest.fixture
def decode_attention_on_cpu(monkeypatch):
    """graphquant's decode attention backend takes CPU decode calls too (the op then runs its reference), to test
    the plumbing without a GPU; yields the list of the query shapes of the op's calls."""
    from graphquant import decode_attention as DA

    monkeypatch.setattr(DA, "DEVICES", ("cuda", "cpu"))
    calls = []
    real = DA.decode_attention_reference

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(DA, "decode_attention_reference", counted)
    return calls
