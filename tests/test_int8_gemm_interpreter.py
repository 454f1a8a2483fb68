"""The prefill W8A8 kernel (``graphquant.kernels.int8_gemm``: int8 codes on the tensor cores, scales fused) in
Triton's CPU interpreter (a subprocess): bit for bit ``torch._int_mm`` followed by the scale epilogue, for
per-row / one activation scale, per-column / one weight scale, with and without bias, K a multiple of the tile
or not, M and N not multiples of it. fp16 outputs (the interpreter's bf16 rounding is not the GPU's; the GPU
test checks bf16 on the H200). ``int8_mm.int8_linear`` routes prefill-sized products through it only where
``PREFILL_TRITON`` is set."""
from __future__ import annotations

from conftest import run_in_triton_interpreter

_CHECK = r"""
import torch
from graphquant.kernels import int8_mm
from graphquant.kernels.int8_gemm import int8_gemm
torch.manual_seed(0)
cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
checked = 0
for M, N, K in ((40, 48, 96), (33, 64, 128), (64, 40, 80)):
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    acc = torch._int_mm(a, w.t()) if K % 8 == 0 and N % 8 == 0 else (a.double() @ w.double().t()).to(torch.int32)
    for sa in (torch.rand(M, 1) / 50, torch.tensor([0.02])):
        for sw in (torch.rand(N) / 100, torch.tensor([0.01])):
            for bias in (None, torch.randn(N).to(torch.float16)):
                want = int8_mm.scale_epilogue_torch(acc, sa, sw, bias, torch.float16)
                out = int8_gemm(a, w, sa, sw, bias, torch.float16, config=cfg)
                assert torch.equal(out, want), (M, N, K, sa.numel(), sw.numel(), bias is not None)
                checked += 1
print("checked", checked)
"""


def test_int8_gemm_equals_int_mm_and_the_scale_epilogue():
    assert "checked 24" in run_in_triton_interpreter(_CHECK)
