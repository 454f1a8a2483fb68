"""W8A16 at decode sizes on int8 tensor cores: float activation rows cut into int8 slices.

A float (bf16 / fp16) activation row ``x`` is written as ``x = sum_j s_j * p_j`` over ``SLICES`` (4) slices:
``p_j`` int8 codes in [-64, 64], ``s_j = s_0 * 2^(-7 j)``, and ``s_0 = 2^(E - 5)`` a power of two, with ``E``
the exponent of the row's largest magnitude (amax in [2^E, 2^(E+1)), so |x| / s_0 < 64). Each step multiplies by
a power of two, rounds to the nearest integer and subtracts exactly, so every residual is held exactly in fp32
and ``|residual_j| <= s_j / 2``: the slices reproduce every bf16 element within 2^21 of the row's largest one
exactly, smaller ones to within ``s_3 / 2 < amax * 2^-26``. Then

    x @ (w * sw).T = sw * sum_j s_j * (p_j @ w.T)

is ``SLICES`` int8 x int8 dot products with int32 accumulation (exact: |sum| <= 64 * 127 * K < 2^31 for K up to
260,000), added up in fp32 once at the end: the W8A8 tensor-core kernel at ``SLICES`` times the rows, with a
float activation. The error is that of fp32 arithmetic, below the bf16 rounding of the result.

Why: at decode batch 1 the weight-only GEMV on CUDA cores (``quant_triton.gemv_packed``) turns every code into
a float and multiplies it (about 3.5 operations per weight byte); int8 codes go into the tensor cores as they
are. On the H200 the W8A8 kernel streams the Llama-3-8B gate|up weight at 3.98 TB/s and ``gemv_packed`` the
same int8 weight at 3.1 TB/s (``benchmarks/results/decode_kernels.json``, ``decode_kernels_gemlite.json``).

One program: ``BLOCK_N`` output columns of up to ``BLOCK_M`` activation rows (``BLOCK_M * SLICES`` rows of
slices in the dot), over its split of K: a first pass over its K range finds each row's amax (the scales of a
split are its own; the splits' fp32 partial sums are added afterwards), the second cuts each K tile into
slices and feeds them, with the weight tile, to ``tl.dot``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant_triton import (_bias, _last_split_sums, _split_outputs, _split_range, _split_rows, _sm_count,
                           _tuned, _device_name, m_bucket, split_sum, A_INT8, W_INT8)

SLICES = 4
#: at most this many activation rows go through :func:`sliced_mm` (``BLOCK_M * SLICES`` rows of slices per dot)
MAX_M = 16
#: route W8A16 decode products (M <= ``MAX_M``) through :func:`sliced_mm`; off: not yet timed on a GPU
ENABLED = False

_ROUND: tl.constexpr = tl.constexpr(12582912.0)  # 1.5 * 2^23: (v + _ROUND) - _ROUND rounds |v| < 2^22 half-even


@triton.jit
def _pow2(biased):
    """2^(biased - 127) from its exponent bits (1 <= biased <= 254)."""
    return (biased << 23).to(tl.float32, bitcast=True)


@triton.jit
def _slices(x, e0, BM: tl.constexpr, BK: tl.constexpr):
    """fp32 rows ``x`` (BM, BK) -> their 4 int8 slices stacked slice-major (4 * BM, BK); ``e0`` (BM,) the biased
    exponent of each row's ``s_0``."""
    v = x
    e = e0[:, None]
    p0 = (v * _pow2(254 - e) + _ROUND) - _ROUND
    v = v - p0 * _pow2(e)
    p1 = (v * _pow2(254 - (e - 7)) + _ROUND) - _ROUND
    v = v - p1 * _pow2(e - 7)
    p2 = (v * _pow2(254 - (e - 14)) + _ROUND) - _ROUND
    v = v - p2 * _pow2(e - 14)
    p3 = (v * _pow2(254 - (e - 21)) + _ROUND) - _ROUND
    j = tl.join(tl.join(p0, p1), tl.join(p2, p3))  # (BM, BK, 2, 2): slice 2 * [..., b] + [..., a, :]
    j = tl.permute(j, (3, 2, 0, 1))
    return tl.reshape(j, (4 * BM, BK)).to(tl.int8)


@triton.jit
def sliced_mm_kernel(A, B, SW, BIAS, C, OUT, COUNT, M, N, K, stride_am, stride_bn, stride_cm,
                     W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K, PARTIAL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     LAST_SUMS: tl.constexpr = False):
    """``C = A @ (B * SW).T (+ BIAS)``: A float (M, K), B int8 (N, K), SW one scale or one per column (``W_SCALE``
    0 / 1). Split-K as ``quant_triton.wq_mm_kernel`` (an fp32 workspace slice per split, summed by the tile's
    last split with ``LAST_SUMS``, else by ``split_sum``; the bias only in split 0)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    k_lo, k_hi = _split_range(pid_k, K, SPLIT_K, BLOCK_K)
    a_rows = A + rm.to(tl.int64)[:, None] * stride_am
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(a_rows + rk[None, :], mask=m_ok[:, None] & (rk < K)[None, :], other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    # s_0 = 2^(E - 5); clamped so that s_3 stays a normal float (rows below 2^-90 lose precision, never range)
    e0 = tl.maximum(((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 5, 22)
    acc = tl.zeros((4 * BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(a_rows + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        wt = tl.load(B + rn[None, :].to(tl.int64) * stride_bn + rk[:, None], mask=n_ok[None, :] & k_ok[:, None],
                     other=0)
        acc += tl.dot(_slices(x, e0, BLOCK_M, BLOCK_K), wt, out_dtype=tl.int32)
    e = tl.join(tl.join(e0, e0 - 7), tl.join(e0 - 14, e0 - 21))  # (BM, 2, 2), slice-major as _slices
    scale = _pow2(tl.reshape(tl.permute(e, (2, 1, 0)), (4 * BLOCK_M,)))
    part = acc.to(tl.float32) * scale[:, None]
    out = tl.sum(tl.reshape(part, (4, BLOCK_M, BLOCK_N)), axis=0)
    if W_SCALE == 1:
        out = out * tl.load(SW + rn, mask=n_ok, other=0.0)[None, :]
    else:
        out = out * tl.load(SW)
    if HAS_BIAS:
        out = out + _bias(BIAS, rn, n_ok, pid_k, PARTIAL)[None, :]
    c_ptrs = _split_rows(C, pid_k, M, stride_cm) + rm[:, None] * stride_cm + rn[None, :]
    tl.store(c_ptrs, out.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    if LAST_SUMS:
        _last_split_sums(C, OUT, COUNT, pid_n, rm, rn, M, N, stride_cm, SPLIT_K)


def _config(M: int, N: int, K: int, device, cfg: dict | None) -> dict:
    """Tile options: ``cfg`` completed, else the W8A8 int8 kernel's measured tiles for this shape at
    ``SLICES * M`` rows (the same dot), else 64 columns x 256-deep K tiles with split-K up to 2 programs per SM."""
    bm = 1 << max(M - 1, 0).bit_length()
    base = None
    if not cfg:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        t = _tuned(_device_name(idx)).get((A_INT8, W_INT8, N, K, m_bucket(SLICES * max(bm, 4))))
        base = {k: v for k, v in (t or {}).items() if k in ("BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps",
                                                            "num_stages")}
        if not base:
            base = dict(BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=3)
            target = 2 * _sm_count(idx)
            split, tiles = 1, -(-N // 64)
            while tiles * split * 2 <= target and K >= 256 * split * 4:
                split *= 2
            base["SPLIT_K"] = split
    out = dict(base or {}, **(cfg or {}))
    out.setdefault("SPLIT_K", 1)
    out.setdefault("num_warps", 4)
    out.setdefault("num_stages", 3)
    out["BLOCK_M"] = max(bm, 4)  # the dot needs at least 16 rows of slices
    return out


def sliced_mm(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, bias=None, out_dtype=None,
              config: dict | None = None) -> torch.Tensor | None:
    """``a (M, K) float @ (w * w_scale).T (+ bias)`` for int8 ``w`` (N, K) and ``w_scale`` (one, or one per
    output channel): the product on int8 tensor cores through slices of ``a``; None when ``M > MAX_M``."""
    M, K = a.shape
    if M > MAX_M or M == 0:
        return None
    N = w.shape[0]
    out_dtype = out_dtype or a.dtype
    cfg = _config(M, N, K, a.device, config)
    split = cfg["SPLIT_K"]
    grid = (-(-N // cfg["BLOCK_N"]), split)
    c, out, count, last = _split_outputs(M, N, split, grid[0], a.device, out_dtype)
    sliced_mm_kernel[grid](a, w, w_scale, bias if bias is not None else w_scale, c, out, count, M, N, K,
                           a.stride(0), w.stride(0), c.stride(-2), W_SCALE=1 if w_scale.numel() > 1 else 0,
                           HAS_BIAS=bias is not None, PARTIAL=split > 1, LAST_SUMS=last, **cfg)
    return out if last else split_sum(c, out_dtype)
