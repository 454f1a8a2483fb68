"""int8 W8A8 matmul for prefill-sized M with the scale epilogue fused (CUDA, Triton).

``torch._int_mm`` on the H200 (torch 2.11) runs an Ampere cutlass kernel
(``cutlass_80_tensorop_i16832gemm_s8_128x256``) and returns int32, which a second kernel
(``quant_triton.scale_epilogue``) reads back to apply the scales: 15.4 ms of matmul and 2.0 ms of epilogue in
a 27 ms 2-layer Llama-3-8B-shaped 8x2048 prefill, where fp8's sm_90 kernel takes 10.4 ms for the same products
(``benchmarks/results/prefill_profile.json``). Here one Triton kernel multiplies the codes on the tensor cores
(Triton emits Hopper's wgmma for 8-bit operands) with int32 accumulation, then applies
``acc * a_scale * w_scale (+ bias)`` in fp32 and stores ``out_dtype``: the same integers and the same fp32
operations, in the same order, as ``_int_mm`` followed by ``scale_epilogue``, so the result is bit for bit
theirs.

``int8_linear`` uses it on Hopper where ``int8_mm.PREFILL_TRITON`` is set (the default):
``benchmarks/int8_prefill_gpu.py`` measured 1.27-1.44x over ``_int_mm`` + epilogue for the Llama-3-8B shapes at
16384 rows on the H200 (results/int8_prefill_gpu.json). Import this module only where Triton exists.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant_triton import scale_rows_cols

#: the launch options used when none are given: a common Hopper 8-bit tile (128 x 256 output, K steps of 128,
#: 3 stages: 144 KiB of shared memory) with grouped ordering of the output tiles for L2 reuse
DEFAULT_CONFIG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)


@triton.jit
def int8_gemm_kernel(A, B, SA, SW, BIAS, C, M, N, K, stride_am, stride_bn, stride_cm,
                     SA_ROW: tl.constexpr, SW_COL: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """``C = (A @ B.T) * SA * SW (+ BIAS)``: ``A`` (M, K) int8 codes, ``B`` (N, K) int8 weight (both K-major),
    int32 accumulation; ``SA`` one fp32 scale per row (``SA_ROW``) or one, ``SW`` per column (``SW_COL``) or
    one. Output tiles are visited in groups of ``GROUP_M`` tile rows (consecutive programs share weight tiles)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows / columns past the end read row M-1 / N-1 again (no masks in the loop); their results are not stored
    rm_load = tl.minimum(rm, M - 1).to(tl.int64)
    rn_load = tl.minimum(rn, N - 1).to(tl.int64)
    a_ptrs = A + rm_load[:, None] * stride_am + rk[None, :]
    b_ptrs = B + rn_load[None, :] * stride_bn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + rk)[None, :] < K, other=0)
            b = tl.load(b_ptrs, mask=(k0 + rk)[:, None] < K, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    m_ok = rm < M
    n_ok = rn < N
    out = scale_rows_cols(acc, rm, rn, m_ok, n_ok, SA, SW, BIAS, SA_ROW, SW_COL, HAS_BIAS)
    c_ptrs = C + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    tl.store(c_ptrs, out.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def int8_gemm(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """``(a * a_scale) @ (w * w_scale).T (+ bias)`` for int8 ``a`` (M, K) and ``w`` (N, K), both with unit
    stride along K; ``a_scale`` fp32 (M, 1) or one element, ``w_scale`` fp32 (N,) or one element. Equal, bit
    for bit, to ``torch._int_mm(a, w.t())`` followed by ``quant_triton.scale_epilogue``."""
    M, K = a.shape
    N = w.shape[0]
    if w.shape[1] != K or a.dtype != torch.int8 or w.dtype != torch.int8:
        raise ValueError(f"int8_gemm takes int8 (M, K) and (N, K) operands, got {tuple(a.shape)} {a.dtype} and "
                         f"{tuple(w.shape)} {w.dtype}")
    if a.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("int8_gemm takes operands with unit stride along K")
    cfg = dict(config or DEFAULT_CONFIG)
    c = torch.empty((M, N), device=a.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return c
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    int8_gemm_kernel[grid](a, w, a_scale, w_scale, bias if bias is not None else w_scale, c, M, N, K,
                           a.stride(0), w.stride(0), c.stride(0), SA_ROW=a_scale.numel() > 1,
                           SW_COL=w_scale.numel() > 1, HAS_BIAS=bias is not None, EVEN_K=K % cfg["BLOCK_K"] == 0,
                           **cfg)
    return c
