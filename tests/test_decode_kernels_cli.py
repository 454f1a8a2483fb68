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
