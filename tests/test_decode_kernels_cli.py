"""``benchmarks/decode_kernels.py`` on a machine without a GPU: one line that says what to do, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_decode_kernels_benchmark_without_a_gpu_says_so_in_one_line():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_kernels.py"), "--cold", "--quick"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [
        "decode_kernels.py times CUDA kernels and needs a CUDA GPU; run it on the GPU machine "
        "(benchmarks/kernel_sass.py inspects the kernels' sm_90 code without one)"], run.stderr[-2000:]


def test_fbgemm_reference_without_the_library_records_why_and_goes_on(monkeypatch):
    """``--fbgemm`` on a machine without ``fbgemm-gpu-genai``: the sweep's row records one error, nothing raises."""
    import builtins

    pytest.importorskip("triton")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import decode_kernels as DK
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    real_import = builtins.__import__

    def no_fbgemm(name, *args, **kwargs):
        if name.startswith("fbgemm_gpu"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fbgemm)
    op = {"a": torch.randn(1, 256, dtype=torch.bfloat16), "w": torch.zeros(64, 128, dtype=torch.uint8),
          "w_scale": torch.rand(64, 2), "w_kind": DK.QT.W_INT4}
    out = DK.fbgemm_reference(op, torch.randn(1, 64), copies=2)
    assert list(out) == ["fbgemm_error"] and out["fbgemm_error"].startswith("ImportError"), out
