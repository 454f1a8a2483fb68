"""``benchmarks/kernel_sass.py`` (decode kernels' sm_90 machine code, without a GPU): the main loop is found and
its instruction count per weight element is in a plausible range for each kernel kind (the weight-only CUDA-core
GEMV decodes each code with integer and float instructions; the int8 tensor-core kernel needs far fewer), with no
register spills. Skipped without Triton's NVIDIA tools."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _tools_present() -> bool:
    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return all(os.path.isfile(os.path.join(base, t)) for t in ("nvdisasm", "cuobjdump", "ptxas"))


@pytest.mark.skipif(not _tools_present(), reason="Triton without its NVIDIA binaries")
def test_kernel_sass_reports_the_main_loop(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kernel_sass

    out = tmp_path / "sass.json"
    for only in ("gemv_packed W8A16 BN16", "wq_mm W8A8 int8"):
        monkeypatch.setattr(sys, "argv", ["kernel_sass.py", "--only", only, "--out", str(out)])
        kernel_sass.main()
        rows = json.loads(out.read_text())["rows"]
        assert rows
        for row in rows:
            assert row["registers"] > 0 and row["stack_bytes"] == 0 and row["local_bytes"] == 0, row
            per = row["loop_instructions_per_element"]
            if only.startswith("gemv_packed"):
                # at least the bit operation, the subtraction and the multiply-add per code; the FADD/LOP3 loop
                assert 3.0 <= per <= 12.0 and row["loop_mix"]["LOP3"] > 0 and row["loop_mix"]["FADD"] > 0, row
            else:  # int8 codes go to the tensor cores: warp-level MMA, or warpgroup MMA with the weight on the left
                mma = "IGMMA" if row["kernel"].endswith("SWAP") else "IMMA"
                assert per < 2.0 and row["loop_mix"].get(mma, 0) > 0, row
        if only.startswith("wq_mm"):
            assert any(r["kernel"].endswith("SWAP") for r in rows), rows
