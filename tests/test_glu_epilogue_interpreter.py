"""The decode kernels' SiLU·mul epilogue (``glu=True``: a gate|up weight whose rows are interleaved in
``GLU_BLOCK`` blocks, the kernel storing ``silu(gate) * up`` itself) in Triton's CPU interpreter (a subprocess):
``wq_mm`` (int8 and fp8 activation codes), ``w8_mma`` (W8A16) and ``w4_i8mma`` (W4A16), one split and the last
split's sums, bias, 1-4 rows: bit for bit ``int8_mm.interleaved_glu`` of the same kernel's plain output, and
``decode_mm`` / ``glu_decode_fits`` run it only where the table's kernel and tiles allow it."""
from __future__ import annotations

from conftest import run_in_triton_interpreter

_CHECK = r"""
import torch
from graphquant.kernels import quant_triton as QT
from graphquant.kernels.int8_mm import interleaved_glu
torch.manual_seed(0)
checked = 0
N, K = 192, 512
for M in (1, 3):
    x = (torch.randn(M, K) * 2).to(torch.bfloat16)
    bias = torch.randn(N).to(torch.bfloat16)
    w8 = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    s8 = torch.rand(N) * 0.02
    w4 = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    s4 = torch.rand(N, K // 128) * 0.02
    q8, sa8 = QT.quantize_rows(x, False)
    qf, saf = QT.quantize_rows(x, True)
    wf = (torch.randn(N, K) * 40).to(torch.float8_e4m3fn)
    cases = []
    for split in (1, 2):
        cases += [
            (QT.wq_mm, dict(a=q8, w=w8, w_scale=s8, w_kind=QT.W_INT8, a_scale=sa8),
             dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=split, num_warps=4, num_stages=1)),
            (QT.wq_mm, dict(a=qf, w=wf, w_scale=s8, w_kind=QT.W_FP8, a_scale=saf),
             dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=split, num_warps=4, num_stages=1, SWAP=True)),
            (QT.w8_mma, dict(a=x, w=w8, w_scale=s8, w_kind=QT.W_INT8),
             dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=split, num_warps=4, num_stages=1)),
        ]
        if M <= 4:
            cases.append((QT.w4_i8mma, dict(a=x, w=w4, w_scale=s4, w_kind=QT.W_INT4, group=128),
                          dict(BLOCK_N=64, SPLIT_K=split, GPS=2 if M > 1 else 4, num_warps=4, num_stages=1)))
    for fn, op, cfg in cases:
        # the plain product in fp32, rounded by torch (the interpreter truncates in .to(bfloat16); the GPU rounds)
        plain = fn(**op, bias=bias, out_dtype=torch.float32, config=dict(cfg)).to(torch.bfloat16)
        got = fn(**op, bias=bias, out_dtype=torch.bfloat16, config=dict(cfg), glu=True)
        want = interleaved_glu(plain)
        assert got.shape == (M, N // 2), (fn.__name__, got.shape)
        assert torch.equal(got, want), (fn.__name__, M, cfg, (got == want).float().mean())
        checked += 1
    assert QT.wq_mm(q8, w8, s8, w_kind=QT.W_INT8, a_scale=sa8, config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128,
                    SPLIT_K=1, num_warps=4, num_stages=1), glu=True) is None  # a tile without whole block pairs
    assert QT.w4_i8mma(x, w4[:, :], s4, group=128, gated=True, glu=True) is None
assert QT.glu_fits(192, 64, 1) and QT.glu_fits(192, 64, 2) and not QT.glu_fits(200, 64, 1)
assert not QT.glu_fits(192, 16, 1)
QT.LAST_SPLIT_SUMS = False
assert not QT.glu_fits(192, 64, 2) and QT.glu_fits(192, 64, 1)
QT.LAST_SPLIT_SUMS = True
print("glu", checked)
"""


def test_decode_kernels_store_the_silu_mul_of_an_interleaved_gate_up_product():
    assert "glu 16" in run_in_triton_interpreter(_CHECK)
