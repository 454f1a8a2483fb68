"""The prefill W8A8 kernel on CUDA (``graphquant.kernels.int8_gemm``): bit for bit ``torch._int_mm`` + the scale
epilogue at Llama-3-8B shapes in bf16, directly and through ``int8_mm.int8_linear`` with ``PREFILL_TRITON``.
Skipped without CUDA (CI has none); the interpreter test checks the numerics on CPU."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("M,N,K", [(300, 4096, 4096), (2048, 1024, 14336), (777, 6144, 4096)])
@pytest.mark.parametrize("per_row", [True, False])
def test_int8_gemm_equals_int_mm_and_epilogue(M, N, K, per_row, monkeypatch):
    from graphquant.kernels import int8_mm
    from graphquant.kernels import quant_triton as QT
    from graphquant.kernels.int8_gemm import int8_gemm

    g = torch.Generator(device="cuda").manual_seed(M)
    a = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8, generator=g)
    sa = (torch.rand(M, 1, device="cuda", generator=g) if per_row else torch.rand(1, 1, device="cuda")) / 50
    sw = torch.rand(N, device="cuda", generator=g) / 100
    bias = torch.randn(N, device="cuda", generator=g).to(torch.bfloat16)
    want = QT.scale_epilogue(torch._int_mm(a, w.t()), sa, sw, bias, torch.bfloat16)
    assert torch.equal(int8_gemm(a, w, sa, sw, bias, torch.bfloat16), want)
    before = int8_mm.int8_linear(a, sa, w, sw, bias, torch.bfloat16)
    monkeypatch.setattr(int8_mm, "PREFILL_TRITON", True)
    assert torch.equal(int8_mm.int8_linear(a, sa, w, sw, bias, torch.bfloat16), before)
    assert "int8_gemm" not in int8_mm._FAILED
