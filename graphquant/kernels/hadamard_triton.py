"""Triton kernels for ``graphquant::hadamard_transform`` on CUDA.

Imported lazily (on the first CUDA call of the op), so CPU-only installs never import Triton.

Numerics
    The transform is a chain of products with ±1 matrices, run on the tensor cores in bf16 with
    fp32 accumulation. A ±1 matrix is exact in bf16; the other operand is split into bf16 pieces
    (``hi = bf16(v)``, ``mid = bf16(v - hi)``, …) whose products are accumulated in fp32, so every
    stage is exact to fp32 accumulation: 1 piece for bf16 inputs, 2 for fp16 inputs and for
    intermediates that end in a 16-bit output (16 significant bits), 3 for fp32 (24 bits). The
    ``1/√n`` scale is applied once, before the single final rounding.

Kernels (the convention is ``graphquant.hadamard``'s: ``y = x @ H_nᵀ``, ``H_n = H_m ⊗ H_{2^k}``)
    * ``dense`` (``n ≤ 256``, or when no factored plan exists and ``n ≤ 4096``): a GEMM of the rows
      with the ±1 matrix ``H_nᵀ`` (zero-padded). For ``n ≤ 128`` a persistent variant keeps the
      matrix on chip and loops over blocks of rows.
    * ``factored``: one row at a time, viewed as a matrix ``X`` of shape ``(M0, N)`` with
      ``M0 = m·2^i`` and ``N = 2^(k-i) = D1·D2``. Then ``Y = A · X · H_N`` with ``A = H_m ⊗ H_{2^i}``
      (loaded, zero-padded) and ``H_N = H_{D1} ⊗ H_{D2}`` (generated as ``(-1)^popcount(i & j)``).
      The tiled kernel computes ``BM`` rows of ``Y`` per program: a K-loop of ``A``-tile × ``X``-chunk
      products (the only stage that reads memory), then the Sylvester stages on the ``(BM, D1, D2)``
      tile in registers (the ``D1`` stage as a batched product or through permutes), then one store.
      When one tile covers the row (``BM ≥ M0``) the persistent kernel builds ``A`` and ``H`` once
      per program and loops over rows; its sliced twin (``Plan.col_split``, ``Plan.row_split``, ``D1 = 1``:
      Llama-3-8B's 14336 at prefill) splits ``H_N = H_2 ⊗ H_{N/2}``, applies ``H_2`` as an fp32 butterfly
      across the two column halves of ``A · X`` and runs only ``H_{N/2}`` on the tensor cores, row block by row block.
      The cost per element is about ``M0 + 2·(D1 + D2)`` multiply-adds on the tensor cores;
      :func:`plan` takes measured plans for common orders (``_TUNED``) and otherwise minimises an
      estimate of it. A persistent kernel that fails to compile falls back to its tiled twin.
    * ``hadamard_quantize`` (QuaRot's R4 and the activation quantizer after it): the persistent kernels
      store codes and per-row scales instead of the transform (a static scale's codes through its verified
      multiplier, ``STATIC_MULTIPLIER``); at most ``FEW_ROWS`` rows (decode) the tiled
      kernel does, under a static scale per tile, or for a dynamic per-row scale by storing its rounded tile
      and the tile's maximum for ``quant_triton.tile_quant_kernel`` to quantize (two small launches).
    * ``hadamard_pieces`` (QuaRot's R4 before a W4A16 product on ``quant_triton.w4_i8mma`` at one row): the tiled
      kernel, one program per step of four groups, stores ``w4_i8mma``'s int8 pieces of the transform instead
      of the transform (``graphquant::int4_linear(..., hadamard=True)`` at decode).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import hadamard as _had
from .quant_triton import (FP8_MAX, TINY_C, _fp32_reciprocal, _int8_pieces, codes, codes_by, empty_pieces, fast_codes,
                           multiplier_flags, static_multiplier, store_pieces, tile_quant_kernel)

__all__ = ["hadamard_transform_triton", "hadamard_quantize", "hadamard_pieces", "pieces_fusable", "fusable",
           "supports", "plan", "candidates", "Plan", "few_rows_plan", "FEW_ROWS"]

DENSE_MAX = 256            # orders handled by the dense kernel by preference
DENSE_FALLBACK_MAX = 4096  # largest dense matrix used when no factored plan exists
TILE_MAX = 16384           # elements of one program's fp32 tile (BM · N)
PERMUTE_COST = 48          # extra multiply-adds/element charged for the D1 stage's permutes

# The dot operands' dtype. bf16 on GPUs; Triton's CPU interpreter (TRITON_INTERPRET=1, used to test
# the kernels without a GPU) mishandles bf16 dots, so there the operands (bf16 values, exact in
# fp32) are widened to fp32, which gives the same sums.
_OPERAND = tl.float32 if os.environ.get("TRITON_INTERPRET") == "1" else tl.bfloat16


# ---------------------------------------------------------------------------------------------
# Device code
# ---------------------------------------------------------------------------------------------
@triton.jit
def _sylvester(D: tl.constexpr, LOG: tl.constexpr, OP: tl.constexpr):
    """The ``D×D`` Sylvester matrix ``(-1)^popcount(i & j)`` in dtype ``OP`` (symmetric)."""
    both = tl.arange(0, D)[:, None] & tl.arange(0, D)[None, :]
    parity = tl.zeros((D, D), dtype=tl.int32)
    for b in tl.static_range(LOG):
        parity = parity ^ ((both >> b) & 1)
    return (1 - 2 * parity).to(OP)


@triton.jit
def _dot_split_left(x, h, acc, PARTS: tl.constexpr, OP: tl.constexpr):
    """``acc + x @ h`` with fp32 ``x`` split into ``PARTS`` bf16 pieces and a ±1 matrix ``h``."""
    hi = x.to(tl.bfloat16)
    acc = tl.dot(hi.to(OP), h, acc)
    if PARTS > 1:
        rest = x - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        acc = tl.dot(mid.to(OP), h, acc)
        if PARTS > 2:
            acc = tl.dot((rest - mid.to(tl.float32)).to(tl.bfloat16).to(OP), h, acc)
    return acc


@triton.jit
def _dot_split_right(a, x, acc, PARTS: tl.constexpr, OP: tl.constexpr):
    """``acc + a @ x`` with a ±1 matrix ``a`` and fp32 ``x`` split into ``PARTS`` bf16 pieces."""
    hi = x.to(tl.bfloat16)
    acc = tl.dot(a, hi.to(OP), acc)
    if PARTS > 1:
        rest = x - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        acc = tl.dot(a, mid.to(OP), acc)
        if PARTS > 2:
            acc = tl.dot(a, (rest - mid.to(tl.float32)).to(tl.bfloat16).to(OP), acc)
    return acc


@triton.jit
def _dense_kernel(x_ptr, g_ptr, y_ptr, R, N, G_STRIDE, scale,
                  BR: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NKC: tl.constexpr,
                  IN_PARTS: tl.constexpr, OP: tl.constexpr):
    """``Y[rows, cols] = scale · X[rows, :] @ G[:, cols]`` for a zero-padded ±1 matrix ``G``."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok = rows[:, None] < R
    row_off = rows.to(tl.int64)[:, None] * N
    acc = tl.zeros((BR, BN), dtype=tl.float32)
    for kc in tl.static_range(NKC):
        ks = kc * BK + tl.arange(0, BK)
        x = tl.load(x_ptr + row_off + ks[None, :], mask=row_ok & (ks[None, :] < N), other=0.0)
        g = tl.load(g_ptr + ks[:, None] * G_STRIDE + cols[None, :]).to(OP)
        acc = _dot_split_left(x.to(tl.float32), g, acc, IN_PARTS, OP)
    y = (acc * scale).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row_off + cols[None, :], y, mask=row_ok & (cols[None, :] < N))


@triton.jit
def _tile_amax(y, mask):
    """The absolute maximum of the 2-D tile ``y`` where ``mask`` holds (fp32)."""
    return tl.max(tl.max(tl.where(mask, tl.abs(y.to(tl.float32)), 0.0), axis=1), axis=0)


@triton.jit
def _factored_kernel(x_ptr, a_ptr, y_ptr, M0, A_STRIDE, scale, s_in_ptr, ws_ptr, amax_ptr, h_ptr,
                     BM: tl.constexpr, NT: tl.constexpr, BK: tl.constexpr, NKC: tl.constexpr,
                     D1: tl.constexpr, LOG1: tl.constexpr, D2: tl.constexpr, LOG2: tl.constexpr,
                     IN_PARTS: tl.constexpr, MID_PARTS: tl.constexpr, MIDDLE: tl.constexpr,
                     OP: tl.constexpr, QUANT: tl.constexpr = 0, STATIC: tl.constexpr = True,
                     QMAX: tl.constexpr = 127.0, RCP: tl.constexpr = 1.0, OUT_DTYPE: tl.constexpr = tl.bfloat16,
                     FAST: tl.constexpr = False, ROWS: tl.constexpr = 0, H_LOADED: tl.constexpr = False):
    """Rows ``t·BM … t·BM+BM-1`` of ``Y = A · X · (H_{D1} ⊗ H_{D2})`` for one row ``X`` (M0 × N); with ``ROWS``
    only rows ``t·ROWS … t·ROWS+ROWS-1`` (the tile's other rows are zeros).

    With ``QUANT`` (1 int8, 2 fp8 e4m3) it stores codes (``y_ptr`` then points to codes):
    * ``STATIC``: under the scale at ``s_in_ptr``; a tile needs no other tile's values.
    * dynamic (a per-row scale, which needs the whole row): it stores the tile, rounded to the activation
      dtype, to the workspace ``ws_ptr`` (``rows × M0·N``) and the tile's absolute maximum to
      ``amax_ptr[row, tile]``; ``quant_triton.tile_quant_kernel`` (a second launch, one program per tile:
      a tile is ``BM·N`` consecutive elements of the row) then quantizes the tiles under their row's scale.
      (Quantizing the row in the row's last program instead measured far slower: about +28 us per Llama-3-8B
      decode layer on the H200, benchmarks/results/generate_gpu_dynamic_r4_last_program_tried.json.)

    ``QUANT`` 3 (one row ``X``, ``ROWS`` = 4, ``D1`` = 1, ``D2`` the group size): each row of ``Y`` is one group of
    the transform; rounded to ``OUT_DTYPE`` they become ``quant_triton.w4_i8mma``'s int8 pieces for the step of
    four groups ``t`` (``y_ptr``: pieces, ``ws_ptr``: row scales, ``amax_ptr``: sums; ``quant_triton.store_pieces``).

    ``H_LOADED``: stage 2's Sylvester matrix ``H_{D2}`` is read from ``h_ptr`` (``D2 × D2`` bf16, L2-resident) with
    ``X``, before stage 1. Built in registers (``_sylvester``) it came after stage 1, on the kernel's critical path:
    the compiler reuses ``X``'s shared memory for it (sm_90 code of the one-row W4A16 kernel: 620 of its 1824
    instructions between the two stages' MMAs)."""
    N: tl.constexpr = D1 * D2
    pid = tl.program_id(0)
    row = pid // NT
    tile = pid % NT
    base = row.to(tl.int64) * M0 * N
    offs_m = tile * (ROWS if ROWS else BM) + tl.arange(0, BM)
    offs_n = tl.arange(0, N)
    a_rows = tl.arange(0, BM) < (ROWS if ROWS else BM)
    if H_LOADED:
        offs_h = tl.arange(0, D2)
        h2 = tl.load(h_ptr + offs_h[:, None] * D2 + offs_h[None, :]).to(OP)
    else:
        h2 = _sylvester(D2, LOG2, OP)

    # Stage 1 (reads memory): acc = A[tile rows, :] @ X, exact for bf16 X.
    acc = tl.zeros((BM, N), dtype=tl.float32)
    for kc in tl.static_range(NKC):
        offs_k = kc * BK + tl.arange(0, BK)
        a = tl.load(a_ptr + offs_m[:, None] * A_STRIDE + offs_k[None, :], mask=a_rows[:, None], other=0.0).to(OP)
        x = tl.load(x_ptr + base + offs_k[:, None] * N + offs_n[None, :], mask=offs_k[:, None] < M0, other=0.0)
        acc = _dot_split_right(a, x.to(tl.float32), acc, IN_PARTS, OP)

    # Stage 2: H_{D2} along the last axis of the (BM, D1, D2) tile.
    t = tl.reshape(acc, (BM * D1, D2))
    t = _dot_split_left(t, h2, tl.zeros((BM * D1, D2), dtype=tl.float32), MID_PARTS, OP)

    # Stage 3: H_{D1} along the middle axis: moved last and back by permutes (MIDDLE = 0), or as
    # a batched left product H_{D1} @ T[b] over the BM rows (MIDDLE = 1; H_{D1} is symmetric).
    if D1 > 1:
        if MIDDLE == 0:
            t = tl.permute(tl.reshape(t, (BM, D1, D2)), (0, 2, 1))
            t = tl.reshape(t, (BM * D2, D1))
            t = _dot_split_left(t, _sylvester(D1, LOG1, OP), tl.zeros((BM * D2, D1), dtype=tl.float32),
                                MID_PARTS, OP)
            t = tl.permute(tl.reshape(t, (BM, D2, D1)), (0, 2, 1))
        else:
            h1 = tl.broadcast_to(tl.reshape(_sylvester(D1, LOG1, OP), (1, D1, D1)), (BM, D1, D1))
            t = _dot_split_right(h1, tl.reshape(t, (BM, D1, D2)), tl.zeros((BM, D1, D2), dtype=tl.float32),
                                 MID_PARTS, OP)

    tile_off = base + offs_m[:, None] * N + offs_n[None, :]
    in_rows = offs_m[:, None] < M0
    if QUANT == 0:
        tl.store(y_ptr + tile_off, (tl.reshape(t, (BM, N)) * scale).to(y_ptr.dtype.element_ty), mask=in_rows)
    elif QUANT == 3:  # the pieces of the step's four groups; rows ROWS.. of the tile are zeros
        y = (tl.reshape(t, (BM, N)) * scale).to(OUT_DTYPE).to(tl.float32)
        # the tile's ROWS rows (the others are exact zeros, so the sum is exact), then their pieces
        y = tl.sum(tl.reshape(y, (BM // ROWS, ROWS, N)), axis=0)
        q, rs = _int8_pieces(tl.reshape(y, (ROWS, 1, N)))  # (ROWS, 4, N), (ROWS, 4)
        store_pieces(q, rs, y_ptr, ws_ptr, amax_ptr, tile)
    elif STATIC:
        _quantize_store((tl.reshape(t, (BM, N)) * scale).to(OUT_DTYPE), in_rows, 0.0, y_ptr + tile_off,
                        s_in_ptr, s_in_ptr, 0, False, QUANT, True, QMAX, RCP, FAST)
    else:
        y = (tl.reshape(t, (BM, N)) * scale).to(OUT_DTYPE)
        tl.store(ws_ptr + tile_off, y, mask=in_rows)
        tl.store(amax_ptr + row * NT + tile, _tile_amax(y, in_rows))


@triton.jit
def _sylvester_stages(t, h1, h2, BM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                      MID_PARTS: tl.constexpr, MIDDLE: tl.constexpr, OP: tl.constexpr):
    """``T · (H_{D1} ⊗ H_{D2})`` for a ``(BM, D1·D2)`` fp32 tile ``T`` (see ``_factored_kernel``)."""
    t = tl.reshape(t, (BM * D1, D2))
    t = _dot_split_left(t, h2, tl.zeros((BM * D1, D2), dtype=tl.float32), MID_PARTS, OP)
    if D1 > 1:
        if MIDDLE == 0:
            t = tl.permute(tl.reshape(t, (BM, D1, D2)), (0, 2, 1))
            t = tl.reshape(t, (BM * D2, D1))
            t = _dot_split_left(t, h1, tl.zeros((BM * D2, D1), dtype=tl.float32), MID_PARTS, OP)
            t = tl.permute(tl.reshape(t, (BM, D2, D1)), (0, 2, 1))
        else:
            hb = tl.broadcast_to(tl.reshape(h1, (1, D1, D1)), (BM, D1, D1))
            t = _dot_split_right(hb, tl.reshape(t, (BM, D1, D2)), tl.zeros((BM, D1, D2), dtype=tl.float32),
                                 MID_PARTS, OP)
    return tl.reshape(t, (BM, D1 * D2))


@triton.jit
def _static_codes(y, sc, rm, QMAX: tl.constexpr, FP8: tl.constexpr, FAST: tl.constexpr, MUL: tl.constexpr):
    """The codes of the rounded transform tile ``y`` under the static scale ``sc``: for ``MUL`` 1 through its verified
    multiplier ``rm`` (``quant_triton.codes_by``), else the exact quotient (``quant_triton.codes``)."""
    if MUL == 1:
        q = codes_by(y.to(tl.float32), rm, QMAX, FP8, FAST)
    else:
        q = codes(y.to(tl.float32), sc, QMAX, FP8, FAST)
    return q


@triton.jit
def _quantize_store(y, mask, row_amax, q_ptrs, s_ptr, s_in_ptr, row, s_mask,
                    QUANT: tl.constexpr, STATIC: tl.constexpr, QMAX: tl.constexpr, RCP: tl.constexpr,
                    FAST: tl.constexpr = False, rm=0.0, MUL: tl.constexpr = 0):
    """Store the codes of ``y`` (the transform's output, already rounded to the activation dtype):
    per-row dynamic scale ``max(amax / QMAX, tiny)`` (stored at ``s_ptr + row``) or the static one (``MUL`` 1:
    through its verified multiplier ``rm``, ``quant_triton.codes_by``).
    Numerics of ``quant_triton.quant_rows_kernel`` (and so of fake-quant)."""
    if STATIC:
        q = _static_codes(y, tl.load(s_in_ptr).to(tl.float32), rm, QMAX, QUANT == 2, FAST, MUL)
    else:
        sc = tl.maximum(row_amax * RCP, TINY_C)
        tl.store(s_ptr + row, sc, mask=s_mask)
        q = codes(y.to(tl.float32), sc, QMAX, QUANT == 2, FAST)
    tl.store(q_ptrs, q, mask=mask)


@triton.jit
def _stage1(a, x, BMH: tl.constexpr, NS: tl.constexpr, IN_PARTS: tl.constexpr, OP: tl.constexpr):
    """``A · X`` (``a`` ±1, ``BMH`` rows; ``x`` a row view or a column slice of it, ``NS`` columns) in fp32, exact to
    fp32 accumulation (``x`` split into ``IN_PARTS`` bf16 pieces)."""
    if IN_PARTS == 1:
        return tl.dot(a, x.to(OP))
    return _dot_split_right(a, x.to(tl.float32), tl.zeros((BMH, NS), dtype=tl.float32), IN_PARTS, OP)


@triton.jit
def _multiplier_rows(f_ptr, sc, ROWS, MUL: tl.constexpr):
    """``(rm, end)`` for a persistent kernel's ``MUL`` launch under the static scale ``sc``: the multiplier from the
    check launch's flags at ``f_ptr`` (``quant_triton.static_multiplier``; 0.0 where none passed) and the row loop's
    end: every row for ``MUL`` 1, for ``MUL`` 2 (the exact codes) every row only where no multiplier passed."""
    rm = static_multiplier(f_ptr, sc)
    end = ROWS
    if MUL == 2:
        end = tl.where(rm == 0.0, ROWS, 0)
    return rm, end


@triton.jit
def _persistent_kernel(x_ptr, a_ptr, y_ptr, ROWS, NPROG, M0, scale, s_ptr, s_in_ptr, f_ptr,
                       BM: tl.constexpr, D1: tl.constexpr, LOG1: tl.constexpr, D1H: tl.constexpr,
                       D2: tl.constexpr, LOG2: tl.constexpr, IN_PARTS: tl.constexpr, MID_PARTS: tl.constexpr,
                       MIDDLE: tl.constexpr, OP: tl.constexpr, STAGES: tl.constexpr,
                       QUANT: tl.constexpr = 0, STATIC: tl.constexpr = False, QMAX: tl.constexpr = 127.0,
                       RCP: tl.constexpr = 1.0, OUT_DTYPE: tl.constexpr = tl.bfloat16,
                       FAST: tl.constexpr = False, MUL: tl.constexpr = 0):
    """The factored transform for ``M0 ≤ BM`` (one row tile), persistent over rows.

    ``A`` (``BM×BM``, zero-padded) and the Sylvester matrices are built once per program and
    stay on chip; each loop iteration loads one row, applies the three stages, stores it. With
    ``QUANT`` (1 int8, 2 fp8 e4m3) it stores the row's codes instead (``y_ptr`` then points to codes)
    and, for a dynamic scale, the row's scale: the transformed row is never written out. ``MUL`` (static scale;
    ``quant_triton.static_multiplier`` of the check launch's flags at ``f_ptr``): 1 the codes through the scale's
    verified multiplier (zeros where the check found none); 2 the exact codes, only where it found none (else it
    takes no row). The launch wrapper launches 1 then 2: no branch in the row loop, no host sync (a loop bound
    read from the flags in kernel 1 too cost 24 registers and spills, ``benchmarks/kernel_sass.py``).
    """
    N: tl.constexpr = D1 * D2
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, N)
    a = tl.load(a_ptr + offs_m[:, None] * BM + offs_m[None, :]).to(OP)
    h2 = _sylvester(D2, LOG2, OP)
    h1 = _sylvester(D1H, LOG1, OP)
    in_rows = offs_m[:, None] < M0
    rm = 0.0
    end = ROWS
    if MUL != 0:
        rm, end = _multiplier_rows(f_ptr, tl.load(s_in_ptr).to(tl.float32), ROWS, MUL)
    for row in tl.range(tl.program_id(0), end, NPROG, num_stages=STAGES):
        base = tl.cast(row, tl.int64) * M0 * N
        x = tl.load(x_ptr + base + offs_m[:, None] * N + offs_n[None, :], mask=in_rows, other=0.0)
        acc = _stage1(a, x, BM, N, IN_PARTS, OP)
        t = _sylvester_stages(acc, h1, h2, BM, D1, D2, MID_PARTS, MIDDLE, OP)
        if QUANT == 0:
            tl.store(y_ptr + base + offs_m[:, None] * N + offs_n[None, :], (t * scale).to(y_ptr.dtype.element_ty),
                     mask=in_rows)
        else:
            y = (t * scale).to(OUT_DTYPE)
            amax = _tile_amax(y, in_rows)
            _quantize_store(y, in_rows, amax, y_ptr + base + offs_m[:, None] * N + offs_n[None, :], s_ptr, s_in_ptr,
                            row, True, QUANT, STATIC, QMAX, RCP, FAST, rm, MUL)


@triton.jit
def _load_slice(x_ptr, base, offs_k, in_k, S: tl.constexpr, N: tl.constexpr, NS: tl.constexpr):
    """Columns ``S·NS … S·NS+NS-1`` of one row ``X`` (``M0 × N``), its padding rows zero."""
    cols = S * NS + tl.arange(0, NS)
    return tl.load(x_ptr + base + offs_k[:, None] * N + cols[None, :], mask=in_k, other=0.0)


@triton.jit
def _slice_emit(b, h, scale, y_ptr, base, rows, in_rows, S: tl.constexpr, N: tl.constexpr, NS: tl.constexpr,
                BMH: tl.constexpr, amax, sc, rm, MID_PARTS: tl.constexpr, OP: tl.constexpr, QUANT: tl.constexpr,
                STATIC: tl.constexpr, QMAX: tl.constexpr, OUT_DTYPE: tl.constexpr, FAST: tl.constexpr,
                MUL: tl.constexpr):
    """Columns ``S·NS …`` of ``B · H_{NS}`` (``B`` one butterfly output, fp32): stored, or their codes under the
    static scale ``sc`` (``MUL`` 1: through its multiplier ``rm``); returns the running absolute maximum (dynamic
    scale) and the tile rounded to ``OUT_DTYPE``, which the caller keeps for its codes under a dynamic scale."""
    z = _dot_split_left(b, h, tl.zeros((BMH, NS), dtype=tl.float32), MID_PARTS, OP) * scale
    cols = S * NS + tl.arange(0, NS)
    off = rows[:, None] * N + cols[None, :]
    y = z.to(OUT_DTYPE)
    if QUANT == 0:
        tl.store(y_ptr + base + off, z.to(y_ptr.dtype.element_ty), mask=in_rows)
    elif STATIC:
        tl.store(y_ptr + base + off, _static_codes(y, sc, rm, QMAX, QUANT == 2, FAST, MUL), mask=in_rows)
    else:
        amax = tl.maximum(amax, _tile_amax(y, in_rows))
    return amax, y


@triton.jit
def _store_codes(y, y_ptr, base, rows, in_rows, S: tl.constexpr, N: tl.constexpr, NS: tl.constexpr, rs,
                 QMAX: tl.constexpr, QUANT: tl.constexpr, FAST: tl.constexpr):
    """The codes of one kept tile (``_slice_emit``'s rounded tile) under the row's dynamic scale ``rs``."""
    cols = S * NS + tl.arange(0, NS)
    tl.store(y_ptr + base + rows[:, None] * N + cols[None, :], codes(y.to(tl.float32), rs, QMAX, QUANT == 2, FAST),
             mask=in_rows)


@triton.jit
def _row_block(a, x0, x1, y_ptr, base, rows, in_rows, h, scale, amax, sc, rm, N: tl.constexpr, NS: tl.constexpr,
               CS: tl.constexpr, BMH: tl.constexpr, IN_PARTS: tl.constexpr, MID_PARTS: tl.constexpr,
               OP: tl.constexpr, QUANT: tl.constexpr, STATIC: tl.constexpr, QMAX: tl.constexpr,
               OUT_DTYPE: tl.constexpr, FAST: tl.constexpr, MUL: tl.constexpr):
    """Rows ``rows`` of ``Y = A · X · H_N`` with ``H_N = H_{CS} ⊗ H_{NS}`` (``CS`` 1 or 2): stage 1 on each column
    slice ``x0``, ``x1`` of ``X``, ``H_2`` as one fp32 butterfly across them, then ``H_{NS}`` on the tensor cores per
    slice (``_slice_emit``). Returns the running absolute maximum and the two slices' rounded tiles."""
    if CS == 1:
        amax, f0 = _slice_emit(_stage1(a, x0, BMH, NS, IN_PARTS, OP), h, scale, y_ptr, base, rows, in_rows, 0, N, NS,
                               BMH, amax, sc, rm, MID_PARTS, OP, QUANT, STATIC, QMAX, OUT_DTYPE, FAST, MUL)
        f1 = f0
    else:
        y0 = _stage1(a, x0, BMH, NS, IN_PARTS, OP)
        y1 = _stage1(a, x1, BMH, NS, IN_PARTS, OP)
        amax, f0 = _slice_emit(y0 + y1, h, scale, y_ptr, base, rows, in_rows, 0, N, NS, BMH, amax, sc, rm, MID_PARTS,
                               OP, QUANT, STATIC, QMAX, OUT_DTYPE, FAST, MUL)
        amax, f1 = _slice_emit(y0 - y1, h, scale, y_ptr, base, rows, in_rows, 1, N, NS, BMH, amax, sc, rm, MID_PARTS,
                               OP, QUANT, STATIC, QMAX, OUT_DTYPE, FAST, MUL)
    return amax, f0, f1


@triton.jit
def _persistent_sliced_kernel(x_ptr, a_ptr, y_ptr, ROWS, NPROG, M0, scale, s_ptr, s_in_ptr, f_ptr,
                              BM: tl.constexpr, N: tl.constexpr, CS: tl.constexpr, LOGS: tl.constexpr,
                              RH: tl.constexpr, IN_PARTS: tl.constexpr, MID_PARTS: tl.constexpr, OP: tl.constexpr,
                              STAGES: tl.constexpr, QUANT: tl.constexpr = 0, STATIC: tl.constexpr = False,
                              QMAX: tl.constexpr = 127.0, RCP: tl.constexpr = 1.0,
                              OUT_DTYPE: tl.constexpr = tl.bfloat16, FAST: tl.constexpr = False,
                              MUL: tl.constexpr = 0):
    """``_persistent_kernel``'s transform (``D1 = 1``: ``Y = A · X · H_N``, one row ``X`` of ``M0 ≤ BM`` rows per
    loop step) with fewer tensor-core products and fewer live registers: ``H_N = H_{CS} ⊗ H_{N/CS}`` (``CS`` 1 or
    2), so stage 1 runs on ``CS`` column slices of ``X``, ``H_{CS}`` is one fp32 butterfly across them and only
    ``H_{N/CS}`` runs on the tensor cores (multiply-adds per element ``BM + MID_PARTS·N/CS`` instead of
    ``BM + MID_PARTS·N``); the ``RH`` (1 or 2) row blocks of ``BM/RH`` rows go from stage 1 to the store one
    after the other. Each stage is exact to fp32 accumulation, as in ``_persistent_kernel`` (the sums are grouped
    differently). With ``QUANT`` it stores codes: under the static scale as each tile is done, or under a dynamic
    per-row scale once the row's maximum is known, the row's rounded tiles kept in registers until then (a
    workspace row read back, or a second launch, measured slower: ``benchmarks/r4_prefill_gpu.py``). ``MUL``: as in
    ``_persistent_kernel``."""
    NS: tl.constexpr = N // CS
    BMH: tl.constexpr = BM // RH
    offs_h = tl.arange(0, BMH)
    offs_k = tl.arange(0, BM)
    a0 = tl.load(a_ptr + offs_h[:, None] * BM + offs_k[None, :]).to(OP)
    if RH == 2:
        a1 = tl.load(a_ptr + (BMH + offs_h)[:, None] * BM + offs_k[None, :]).to(OP)
    else:
        a1 = a0
    h = _sylvester(NS, LOGS, OP)
    sc = 1.0
    rm = 0.0
    end = ROWS
    if QUANT != 0 and STATIC:
        sc = tl.load(s_in_ptr).to(tl.float32)
        if MUL != 0:
            rm, end = _multiplier_rows(f_ptr, sc, ROWS, MUL)
    for row in tl.range(tl.program_id(0), end, NPROG, num_stages=STAGES):
        base = tl.cast(row, tl.int64) * M0 * N
        in_k = offs_k[:, None] < M0
        rows0 = offs_h
        in0 = rows0[:, None] < M0
        rows1 = BMH + offs_h
        in1 = rows1[:, None] < M0
        x0 = _load_slice(x_ptr, base, offs_k, in_k, 0, N, NS)
        x1 = x0
        if CS == 2:
            x1 = _load_slice(x_ptr, base, offs_k, in_k, 1, N, NS)
        amax, t00, t01 = _row_block(a0, x0, x1, y_ptr, base, rows0, in0, h, scale, 0.0, sc, rm, N, NS, CS, BMH,
                                    IN_PARTS, MID_PARTS, OP, QUANT, STATIC, QMAX, OUT_DTYPE, FAST, MUL)
        t10 = t00
        t11 = t01
        if RH == 2:
            amax, t10, t11 = _row_block(a1, x0, x1, y_ptr, base, rows1, in1, h, scale, amax, sc, rm, N, NS, CS, BMH,
                                        IN_PARTS, MID_PARTS, OP, QUANT, STATIC, QMAX, OUT_DTYPE, FAST, MUL)
        if QUANT != 0 and not STATIC:
            rs = tl.maximum(amax * RCP, TINY_C)
            tl.store(s_ptr + row, rs)
            _store_codes(t00, y_ptr, base, rows0, in0, 0, N, NS, rs, QMAX, QUANT, FAST)
            if CS == 2:
                _store_codes(t01, y_ptr, base, rows0, in0, 1, N, NS, rs, QMAX, QUANT, FAST)
            if RH == 2:
                _store_codes(t10, y_ptr, base, rows1, in1, 0, N, NS, rs, QMAX, QUANT, FAST)
                if CS == 2:
                    _store_codes(t11, y_ptr, base, rows1, in1, 1, N, NS, rs, QMAX, QUANT, FAST)


@triton.jit
def _dense_persistent_kernel(x_ptr, g_ptr, y_ptr, R, NBLK, NPROG, N, scale, s_ptr, s_in_ptr, BR: tl.constexpr,
                             NP: tl.constexpr, IN_PARTS: tl.constexpr, OP: tl.constexpr, STAGES: tl.constexpr,
                             QUANT: tl.constexpr = 0, STATIC: tl.constexpr = False, QMAX: tl.constexpr = 127.0,
                             RCP: tl.constexpr = 1.0, OUT_DTYPE: tl.constexpr = tl.bfloat16,
                       FAST: tl.constexpr = False):
    """``Y = scale · X @ G`` for ``n ≤ NP ≤ 128``: ``G`` stays on chip, blocks of ``BR`` rows loop
    (``QUANT``: codes and per-row scales instead, as in ``_persistent_kernel``)."""
    cols = tl.arange(0, NP)
    g = tl.load(g_ptr + cols[:, None] * NP + cols[None, :]).to(OP)
    col_ok = cols[None, :] < N
    for blk in tl.range(tl.program_id(0), NBLK, NPROG, num_stages=STAGES):
        rows = blk * BR + tl.arange(0, BR)
        mask = (rows[:, None] < R) & col_ok
        off = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + off, mask=mask, other=0.0)
        if IN_PARTS == 1:
            acc = tl.dot(x.to(OP), g)
        else:
            acc = _dot_split_left(x.to(tl.float32), g, tl.zeros((BR, NP), dtype=tl.float32), IN_PARTS, OP)
        if QUANT == 0:
            tl.store(y_ptr + off, (acc * scale).to(y_ptr.dtype.element_ty), mask=mask)
        else:
            y = (acc * scale).to(OUT_DTYPE)
            amax = tl.max(tl.where(mask, tl.abs(y.to(tl.float32)), 0.0), axis=1)
            _quantize_store(y, mask, amax[:, None], y_ptr + off, s_ptr, s_in_ptr, rows[:, None],
                            rows[:, None] < R, QUANT, STATIC, QMAX, RCP, FAST)


# ---------------------------------------------------------------------------------------------
# Host side: plans, operands, launch
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How an order ``n`` is computed. ``kind`` is ``"dense"`` or ``"factored"``.

    factored: the row is an ``(M0, D1·D2)`` matrix with ``M0 = m·2^i``; ``A = H_m ⊗ H_{2^i}`` is
    padded to ``(NT·BM, NKC·BK)``; ``middle`` says how the ``D1`` stage runs (0: permutes,
    1: batched product); ``mid_parts`` is the number of bf16 pieces intermediates are split into.
    ``cost`` is the estimated multiply-adds per element.
    """
    kind: str
    n: int
    m: int = 1
    i: int = 0
    M0: int = 0
    D1: int = 1
    D2: int = 1
    BM: int = 0
    BK: int = 0
    middle: int = 1
    mid_parts: int = 2
    num_warps: int = 4
    cost: float = 0.0
    persistent: bool = False  # one row tile (BM ≥ M0) or n ≤ 128: operands stay on chip, rows loop
    ctas: int = 4             # persistent: programs per multiprocessor
    stages: int = 1           # persistent: software-pipelining depth of the row loop
    BR: int = 32              # dense: rows per block
    col_split: int = 1        # persistent, D1 = 1: H_N as an H_{col_split} butterfly ⊗ H_{N/col_split} products (1, 2)
    row_split: int = 1        # persistent, D1 = 1: row blocks of BM/row_split taken one after the other (1, 2)
    maxnreg: int = 0          # persistent, factored: registers per thread the compiler may use (0: its choice)

    @property
    def NT(self) -> int:
        return -(-self.M0 // self.BM) if self.kind == "factored" else 0

    @property
    def NKC(self) -> int:
        return -(-self.M0 // self.BK) if self.kind == "factored" else 0

    def describe(self) -> str:
        per = f" P{self.ctas}s{self.stages}" if self.persistent else ""
        if self.persistent and self.kind == "factored" and (self.col_split > 1 or self.row_split > 1):
            per += f" c{self.col_split}r{self.row_split}"
        if self.persistent and self.maxnreg:
            per += f" R{self.maxnreg}"
        if self.kind == "dense":
            return f"dense n={self.n} BR{self.BR} w{self.num_warps}{per}"
        mid = f"x{self.D1}{'p' if self.middle == 0 else 'b'}" if self.D1 > 1 else ""
        return f"{self.M0}|{self.D2}{mid} BM{self.BM} p{self.mid_parts} w{self.num_warps}{per}"


def _pow2_at_least(v: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(v) - 1).bit_length())


def candidates(n: int, mid_parts: int = 2):
    """Every factored plan for order ``n`` (both middle-stage variants, all row-block sizes)."""
    m, k = _had.factorize(n)
    for i in range(k + 1):
        M0, N = m << i, 1 << (k - i)
        if N < 16 or N > TILE_MAX // 16 or M0 > 512:
            continue
        BK = 16 if M0 <= 16 else 32
        kpad = -(-M0 // BK) * BK
        for log2 in range(4, min(8, k - i) + 1):
            D2, D1 = 1 << log2, N >> log2
            if D1 != 1 and not 16 <= D1 <= 128:
                continue
            BM = 16
            while BM * N <= TILE_MAX and BM <= max(16, _pow2_at_least(M0)):
                mpad = -(-M0 // BM) * BM
                sylv = mid_parts * (D2 + (D1 if D1 > 1 else 0))
                for middle in ((0, 1) if D1 > 1 else (1,)):
                    cost = (kpad + sylv) * mpad / M0
                    warps = 8 if BM * N >= 16384 else 4
                    p = Plan("factored", n, m, i, M0, D1, D2, BM, BK, middle, mid_parts, warps, cost)
                    yield p
                    if BM >= M0 and BM == max(16, _pow2_at_least(M0)):
                        yield dataclasses.replace(p, persistent=True, cost=(BM + sylv) * BM / M0)
                BM *= 2


# Plans measured fastest on an H200 for 16-bit data (benchmarks/hadamard_gpu.py --sweep, 8192 tokens;
# CUDA-graph GPU time vs a copy: 128 → 1.8×, 4096 → 1.3×, 14336 → 2.3×). Other orders use _score.
_TUNED = {
    128: Plan("dense", 128, BR=64, persistent=True, ctas=4, stages=2),
    4096: Plan("factored", 4096, m=1, i=6, M0=64, D1=1, D2=64, BM=64, BK=64, mid_parts=2, num_warps=4,
               cost=192.0, persistent=True, ctas=4, stages=2),
    # the sliced kernel: H_128 as an H_2 butterfly x H_64 products, two row blocks of 64 (benchmarks/r4_prefill_gpu.py,
    # 16384 rows, H200, three sweeps; results/r4_prefill_gpu*.json): transform 0.494 -> 0.337-0.344 ms, + fp8 static
    # codes 0.601-0.606 -> 0.498-0.502, + int8 static 0.641-0.644 -> 0.514-0.518, + fp8 dynamic 0.665-0.667 ->
    # 0.606-0.611, + int8 dynamic 0.678-0.689 -> 0.643-0.648
    14336: Plan("factored", 14336, m=28, i=2, M0=112, D1=1, D2=128, BM=128, BK=32, mid_parts=2, num_warps=4,
                cost=438.9, persistent=True, ctas=2, stages=2, col_split=2, row_split=2),
}


#: up to this many rows (decode: one row per sequence) a factored order runs its plan's tiled twin with
#: 16-row blocks, splitting each row over ``NT`` programs, where the persistent kernel gives one program a
#: whole row. H200, 14336 (112|128), CUDA-graph replay: 1 row 3.9 us vs 7.2 us, 16 rows 4.1 us vs 7.8 us
#: (benchmarks/hadamard_gpu.py --tokens 1/16 --quantize --sweep; results/hadamard_gpu_quantize_1/16.json)
FEW_ROWS = 16
#: the tiled twin's warps and the rows of ``X`` its stage 1 takes per step (``None``: the plan's ``BK``; else up to
#: this many, a power of two, while the step's tile stays within ``TILE_MAX`` elements). H200, 14336 (112|128),
#: CUDA-graph replay, bf16 rows: the same outputs bit for bit (the tensor cores take the K steps in the same order;
#: fp16 rows, two bf16 pieces per element, add the pieces' products in another order) (``benchmarks/r4_decode_gpu.py``,
#: ``results/r4_decode_gpu.json``): all 112 rows in one step (128) against the plan's 32, one row / 16 rows:
#: the W4A16 pieces kernel 5.52 -> 4.89 us, static fp8 4.14 / 4.25 -> 3.70 / 3.88, dynamic fp8 (two launches)
#: 5.92 / 6.15 -> 5.14 / 5.66, the plain transform 4.00 / 4.16 -> 3.36 / 3.56; 8 warps won nothing
FEW_ROWS_WARPS = 4
FEW_ROWS_BK: Optional[int] = 128


def few_rows_plan(p: Plan) -> Plan:
    """The plan for at most ``FEW_ROWS`` rows: a factored plan's tiled twin with ``BM = 16``, ``FEW_ROWS_WARPS``
    warps and stage-1 steps of ``FEW_ROWS_BK`` rows (see there)."""
    if p.kind != "factored":
        return p
    bk = p.BK
    while FEW_ROWS_BK and bk < min(FEW_ROWS_BK, p.M0) and 2 * bk * p.D1 * p.D2 <= TILE_MAX:
        bk *= 2
    return dataclasses.replace(p, persistent=False, BM=16, num_warps=FEW_ROWS_WARPS, BK=bk)


def _score(p: Plan) -> float:
    """Estimated time: multiply-adds, with the penalties measured on an H200 for small row blocks
    (BM = 16 runs about half as fast as BM = 64) and for the permutes of the D1 stage."""
    penalty = {16: 2.0, 32: 1.5}.get(p.BM, 1.0)
    return p.cost * penalty + (PERMUTE_COST if p.D1 > 1 and p.middle == 0 else 0)


@functools.lru_cache(maxsize=256)
def plan(n: int, out_parts: int = 2, force: Optional[str] = None) -> Optional[Plan]:
    """The plan used for order ``n`` (``None``: use the torch fallback).

    ``out_parts`` is the number of bf16 pieces intermediates are split into (2 for 16-bit
    outputs, 3 for fp32); ``force`` = ``"dense"`` or ``"factored"`` restricts the choice.
    """
    if not _had.is_supported(n):
        return None
    if force is None and out_parts == 2 and n in _TUNED:
        return _TUNED[n]
    npad = _pow2_at_least(n)
    dense = Plan("dense", n, cost=float(npad), persistent=npad <= 128, BR=64 if npad <= 128 else 16, stages=2)
    if force == "dense":
        return dense if n <= DENSE_FALLBACK_MAX else None
    if n <= DENSE_MAX and force is None:
        return dense
    best = min(candidates(n, out_parts), key=lambda p: (_score(p), -p.BM), default=None)
    if best is None and force is None and n <= DENSE_FALLBACK_MAX:
        return dense
    return best


@functools.lru_cache(maxsize=64)
def _dense_operand(n: int, transpose: bool, pad: int, device: torch.device) -> torch.Tensor:
    """``G = H_nᵀ`` (``H_n`` for the transpose), ±1, zero-padded to ``pad×pad``, bf16."""
    m, k = _had.factorize(n)
    h = torch.kron(_had.base_matrix(m, torch.float64), _had.base_matrix(1 << k, torch.float64))
    g = torch.zeros(pad, pad, dtype=torch.float64)
    g[:n, :n] = h if transpose else h.T
    return g.to(device=device, dtype=torch.bfloat16)


@functools.lru_cache(maxsize=64)
def _factor_operand(m: int, i: int, transpose: bool, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """``A = H_m ⊗ H_{2^i}`` (``Aᵀ`` for the transpose), ±1, zero-padded to ``rows×cols``, bf16."""
    a = torch.kron(_had.base_matrix(m, torch.float64), _had.base_matrix(1 << i, torch.float64))
    a = a.T if transpose else a
    out = torch.zeros(rows, cols, dtype=torch.float64)
    out[:a.shape[0], :a.shape[1]] = a
    return out.to(device=device, dtype=torch.bfloat16)


@functools.lru_cache(maxsize=16)
def _sylvester_operand(d: int, device: torch.device) -> torch.Tensor:
    """The ``d×d`` Sylvester matrix (what ``_sylvester`` builds in registers; ``d`` a power of two), bf16."""
    return torch.from_numpy(_had.sylvester_matrix(d.bit_length() - 1)).to(device=device, dtype=torch.bfloat16)


def _stage2_operand(d2: int, device: torch.device, fallback: torch.Tensor):
    """``(h, H_LOADED)`` for ``_factored_kernel``: the Sylvester ``H_{d2}`` read from memory (``SYLVESTER_LOADED``)
    or built in registers (``fallback``, any tensor, is then passed as the unused pointer)."""
    if SYLVESTER_LOADED:
        return _sylvester_operand(d2, device), True
    return fallback, False


_PARTS = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}

#: the tiled factored kernel (QuaRot's R4 at decode: ``hadamard_pieces``, ``hadamard_quantize`` and the transform at
#: up to ``FEW_ROWS`` rows) reads stage 2's Sylvester matrix from memory instead of building it in registers after
#: stage 1 (see ``_factored_kernel``)
SYLVESTER_LOADED = True

#: the persistent (prefill) kernels compute static-scale codes through the scale's multiplier: one launch of
#: ``quant_triton.multiplier_check_kernel`` per call checks, for every finite 16-bit input, that ``RN(y · r)`` gives
#: the codes of the correctly rounded ``y / s`` for ``r = RN(1/s)`` or a neighbour; the kernel then takes the
#: first such ``r`` (one multiply per element where the exact quotient takes eight instructions), or the exact
#: quotient where none passed. The same codes bit for bit either way. H200, 16384 x 14336 (QuaRot's R4 at 8 x 2048
#: prefill of Llama-3-8B), the launches timed together (``benchmarks/r4_prefill_gpu.py``,
#: ``results/r4_prefill_gpu_static_multiplier.json``): fp8 static 0.499 -> 0.342 ms, int8 static 0.514 -> 0.373 (the
#: transform alone 0.338); sm_90 loop instructions per element 25.5 -> 17.5 (fp8), 28.1 -> 20.1 (int8)
STATIC_MULTIPLIER = True


def supports(x: torch.Tensor) -> bool:
    """Whether the Triton path handles ``x`` (CUDA, fp32/fp16/bf16, a supported order with a plan)."""
    if not (x.is_cuda and x.dtype in _PARTS and x.dim() >= 1 and x.numel() > 0):
        return False
    return plan(x.shape[-1], 3 if x.dtype == torch.float32 else 2) is not None


@functools.lru_cache(maxsize=16)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's CPU interpreter
    return torch.cuda.get_device_properties(device).multi_processor_count


_FAILED: set = set()  # persistent variants that did not compile here: their tiled twin runs instead


def hadamard_transform_triton(x: torch.Tensor, transpose: bool = False, force: Optional[str] = None,
                              plan_override: Optional[Plan] = None) -> torch.Tensor:
    """``x @ hadamard_matrix(n).T`` (``x @ hadamard_matrix(n)`` if ``transpose``) along the last dim.

    ``force`` and ``plan_override`` exist for benchmarks and tests.
    """
    n = x.shape[-1]
    out_parts = 3 if x.dtype == torch.float32 else 2
    p = plan_override or plan(n, out_parts, force)
    if p is None:
        raise ValueError(f"no Triton plan for order {n} ({x.dtype})")
    x2 = x.reshape(-1, n)
    if plan_override is None and x2.shape[0] <= FEW_ROWS:
        p = few_rows_plan(p)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.empty_like(x2)
    if p.persistent and p not in _FAILED:
        try:
            _launch_persistent(p, x2, y, bool(transpose), out_parts)
            return y.reshape(x.shape)
        except Exception as e:  # noqa: BLE001 - e.g. an older Triton that cannot compile it
            if plan_override is not None:
                raise
            _FAILED.add(p)
            warnings.warn(f"graphquant: persistent Hadamard kernel for {p.describe()} failed "
                          f"({type(e).__name__}: {e}); using the tiled kernel", RuntimeWarning, stacklevel=2)
    _launch_tiled(dataclasses.replace(p, persistent=False), x2, y, bool(transpose), out_parts)
    return y.reshape(x.shape)


def _launch_persistent(p: Plan, x2: torch.Tensor, y: torch.Tensor, transpose: bool, out_parts: int,
                       sq: Optional[torch.Tensor] = None, s_in: Optional[torch.Tensor] = None,
                       quant: Optional[dict] = None, flags: Optional[torch.Tensor] = None) -> None:
    """The persistent kernels; with ``quant`` (constexprs of ``_quantize_store``) ``y`` receives codes and
    ``sq`` the per-row scales (or ``s_in`` is the static scale; ``flags``: its multiplier check, factored plans)."""
    quant = quant or {}
    sq = sq if sq is not None else x2
    s_in = s_in if s_in is not None else x2
    rows, n = x2.shape
    scale = 1.0 / math.sqrt(n)
    in_parts = _PARTS[x2.dtype]
    programs = _multiprocessors(x2.device) * p.ctas
    if p.kind == "dense":
        npad = _pow2_at_least(n)
        g = _dense_operand(n, transpose, npad, x2.device)
        nblk = triton.cdiv(rows, p.BR)
        nprog = max(1, min(nblk, programs))
        _dense_persistent_kernel[(nprog,)](x2, g, y, rows, nblk, nprog, n, scale, sq, s_in, BR=p.BR, NP=npad,
                                           IN_PARTS=in_parts, OP=_OPERAND, STAGES=p.stages, num_warps=p.num_warps,
                                           **quant)
        return
    a = _factor_operand(p.m, p.i, transpose, p.BM, p.BM, x2.device)
    nprog = max(1, min(rows, programs))
    f = flags if flags is not None else x2
    for mul in ((1, 2) if flags is not None else (0,)):  # the multiplier's codes, else (none passed) the exact ones
        _launch_factored_persistent(p, x2, a, y, rows, nprog, scale, sq, s_in, f, in_parts, out_parts,
                                    dict(quant, MUL=mul) if mul else quant)


def _launch_factored_persistent(p: Plan, x2, a, y, rows, nprog, scale, sq, s_in, f, in_parts, out_parts, quant):
    """One launch of a factored plan's persistent kernel (sliced where the plan splits columns or rows)."""
    if p.maxnreg:
        quant = dict(quant, maxnreg=p.maxnreg)
    if p.col_split > 1 or p.row_split > 1:
        if p.D1 != 1 or p.col_split not in (1, 2) or p.row_split not in (1, 2) or p.D2 // p.col_split < 16:
            raise ValueError(f"no sliced persistent kernel for {p.describe()}")
        ns = p.D2 // p.col_split
        _persistent_sliced_kernel[(nprog,)](
            x2, a, y, rows, nprog, p.M0, scale, sq, s_in, f, BM=p.BM, N=p.D2, CS=p.col_split, LOGS=ns.bit_length() - 1,
            RH=p.row_split, IN_PARTS=in_parts, MID_PARTS=min(p.mid_parts, out_parts), OP=_OPERAND, STAGES=p.stages,
            num_warps=p.num_warps, **quant)
        return
    d1h = max(p.D1, 16)
    _persistent_kernel[(nprog,)](
        x2, a, y, rows, nprog, p.M0, scale, sq, s_in, f, BM=p.BM, D1=p.D1, LOG1=d1h.bit_length() - 1, D1H=d1h,
        D2=p.D2, LOG2=p.D2.bit_length() - 1, IN_PARTS=in_parts, MID_PARTS=min(p.mid_parts, out_parts),
        MIDDLE=p.middle, OP=_OPERAND, STAGES=p.stages, num_warps=p.num_warps, **quant)


def _few_rows_tiled(p: Optional[Plan], rows: Optional[int]) -> bool:
    """Whether :func:`hadamard_quantize` runs the tiled kernel with its quantization epilogue: a factored
    order, at most ``FEW_ROWS`` rows (decode)."""
    return rows is not None and rows <= FEW_ROWS and p is not None and p.kind == "factored"


@torch.compiler.assume_constant_result
def fusable(n: int, dtype: torch.dtype, rows: Optional[int] = None) -> bool:
    """Whether :func:`hadamard_quantize` has a kernel for ``rows`` rows of ``n`` elements of ``dtype``: the
    persistent kernels (a row on one program; dynamic or static scale), or at most ``FEW_ROWS`` rows the
    tiled kernel of every factored order. Under ``torch.compile`` (the lowered graphs ask it while traced) its
    result is taken as a constant: Dynamo does not trace the plan search (:func:`plan`'s ``min`` with a key is
    not traceable; that broke the compile of any order outside ``_TUNED``, e.g. gq-llama-20m's 1152, on the
    GPU)."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    p = plan(n, 3 if dtype == torch.float32 else 2)
    if _few_rows_tiled(p, rows):
        return True
    return p is not None and p.persistent and p not in _FAILED and not (p.kind == "factored" and p.M0 > p.BM)


def pieces_fusable(n: int, group: int, rows: int) -> bool:
    """Whether :func:`hadamard_pieces` takes ``rows`` rows of order ``n`` for groups of ``group``: one row, a
    factored plan whose last stage is one Sylvester block of the group's size (each row of its ``(M0, D2)`` view is
    one group) and whose ``M0`` groups make whole steps of four."""
    p = plan(n, 2)
    return rows == 1 and p is not None and p.kind == "factored" and p.D1 == 1 and p.D2 == group and p.M0 % 4 == 0


def hadamard_pieces(x: torch.Tensor, group: int):
    """QuaRot's online Hadamard of one row ``x`` (1, n) (bf16 / fp16) with ``quant_triton.w4_i8mma``'s int8 pieces
    of the transform (rounded to ``x``'s dtype first, as the unfused ops do) made in its epilogue, four groups per
    step: ``(P, RS, XS)`` for ``w4_i8mma(..., pieces=...)``, the values ``int8_pieces_kernel`` makes from
    ``hadamard_transform(x)``. One launch of the tiled factored kernel, one program per step."""
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    if x.dtype not in (torch.bfloat16, torch.float16) or not pieces_fusable(n, group, rows):
        raise ValueError(f"no fused Hadamard + int8 pieces kernel for order {n}, group {group}, {rows} rows")
    p = few_rows_plan(plan(n, 2))
    x2 = x.reshape(1, n)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    steps = p.M0 // 4
    P, RS, XS = empty_pieces(steps, 4 * group, x.device)
    a = _factor_operand(p.m, p.i, False, p.M0 + 16, p.NKC * p.BK, x.device)
    h, loaded = _stage2_operand(p.D2, x.device, a)
    out_dtype = tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16
    _factored_kernel[(steps,)](
        x2, a, P, p.M0, a.shape[1], 1.0 / math.sqrt(n), x2, RS, XS, h, H_LOADED=loaded, BM=16, NT=steps, BK=p.BK,
        NKC=p.NKC, D1=1, LOG1=0, D2=p.D2, LOG2=p.D2.bit_length() - 1, IN_PARTS=_PARTS[x.dtype],
        MID_PARTS=min(p.mid_parts, 2), MIDDLE=p.middle, OP=_OPERAND, QUANT=3, OUT_DTYPE=out_dtype, ROWS=4,
        num_warps=p.num_warps)
    return P, RS, XS


def hadamard_quantize(x: torch.Tensor, fp8: bool, static_scale: Optional[torch.Tensor] = None,
                      plan_override: Optional[Plan] = None):
    """QuaRot's online Hadamard then activation quantization in one kernel: ``(codes, scale)`` of
    ``hadamard_transform(x)`` exactly as ``quantize_rows`` would give them (the transform rounded to
    ``x``'s dtype first, as the unfused ops do), without writing the transformed rows out (except, for a
    dynamic scale at few rows, to a workspace that a second launch quantizes). ``scale``:
    fp32 ``x.shape[:-1] + (1,)`` per row, or None when ``static_scale`` (one fp32 element) is given.
    Orders whose plan has no persistent kernel (rows longer than one on-chip tile) raise ValueError
    (the caller runs the two ops instead), except at most ``FEW_ROWS`` rows (:func:`fusable`): then the
    tiled kernel (:func:`few_rows_plan`) runs with the quantization in its epilogue.
    ``plan_override`` (benchmarks) picks the kernel: a persistent plan, or a tiled factored one."""
    n = x.shape[-1]
    out_parts = 3 if x.dtype == torch.float32 else 2
    static = static_scale is not None
    rows = x.numel() // n if n else 0
    if not fusable(n, x.dtype, rows):
        raise ValueError(f"no fused Hadamard+quantize kernel for order {n} ({x.dtype})")
    p = plan_override or plan(n, out_parts)
    tiled = not p.persistent if plan_override is not None else _few_rows_tiled(p, rows)
    if tiled and (p.kind != "factored" or rows > FEW_ROWS):
        raise ValueError(f"the tiled Hadamard+quantize kernel takes a factored plan and at most {FEW_ROWS} rows, "
                         f"got {p.describe()} for {rows} rows")
    x2 = x.reshape(-1, n)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    q = torch.empty((rows, n), device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    sq = None if static else torch.empty((rows,), device=x.device, dtype=torch.float32)
    qmax = FP8_MAX if fp8 else 127.0
    out_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[x.dtype]
    quant = dict(QUANT=2 if fp8 else 1, QMAX=qmax, RCP=_fp32_reciprocal(qmax), OUT_DTYPE=out_dtype, FAST=fast_codes())
    s_in = static_scale.reshape(1).float() if static else None
    if tiled:
        _launch_tiled(p if plan_override is not None else few_rows_plan(p), x2, q, False, out_parts, s_in, quant, sq)
    else:
        flags = None
        if static and STATIC_MULTIPLIER and p.kind == "factored":
            flags = multiplier_flags(s_in, fp8, x.dtype)
        _launch_persistent(p, x2, q, False, out_parts, sq, s_in, dict(quant, STATIC=static), flags)
    return q.reshape(x.shape), (None if static else sq.reshape(*x.shape[:-1], 1))


def _launch_tiled(p: Plan, x2: torch.Tensor, y: torch.Tensor, transpose: bool, out_parts: int,
                  s_in: Optional[torch.Tensor] = None, quant: Optional[dict] = None,
                  sq: Optional[torch.Tensor] = None) -> None:
    """The tiled kernels; with ``quant`` (a factored plan only) ``y`` receives codes under the static scale
    ``s_in``, or, without one, the per-row scales go to ``sq`` (a second launch quantizes the tiles)."""
    quant = quant or {}
    rows, n = x2.shape
    scale = 1.0 / math.sqrt(n)
    in_parts = _PARTS[x2.dtype]
    if p.kind == "dense":
        if quant:
            raise ValueError("the tiled dense kernel has no quantization epilogue")
        npad = _pow2_at_least(n)
        g = _dense_operand(n, transpose, npad, x2.device)
        BN, BK = min(npad, 128), min(npad, 64)
        BR = 32 if npad <= 128 else 16
        _dense_kernel[(triton.cdiv(rows, BR), npad // BN)](
            x2, g, y, rows, n, npad, scale, BR=BR, BN=BN, BK=BK, NKC=npad // BK,
            IN_PARTS=in_parts, OP=_OPERAND, num_warps=4)
        return
    a = _factor_operand(p.m, p.i, transpose, p.NT * p.BM, p.NKC * p.BK, x2.device)
    dynamic = bool(quant) and s_in is None
    ws = amax = x2
    if dynamic:
        ws = torch.empty_like(x2)
        amax = torch.empty((rows, p.NT), dtype=torch.float32, device=x2.device)
        quant = dict(quant, STATIC=False)
    h, loaded = _stage2_operand(p.D2, x2.device, a)
    _factored_kernel[(rows * p.NT,)](
        x2, a, y, p.M0, a.shape[1], scale, s_in if s_in is not None else x2, ws, amax, h, H_LOADED=loaded, BM=p.BM,
        NT=p.NT, BK=p.BK, NKC=p.NKC, D1=p.D1, LOG1=max(p.D1.bit_length() - 1, 0), D2=p.D2,
        LOG2=p.D2.bit_length() - 1, IN_PARTS=in_parts, MID_PARTS=min(p.mid_parts, out_parts), MIDDLE=p.middle,
        OP=_OPERAND, num_warps=p.num_warps, **quant)
    if dynamic:  # a tile of the (M0, N) view is BM·N consecutive elements of its row
        tile_quant_kernel[(rows, p.NT)](ws, y, sq, amax, n, n, n, p.NT, T_PAD=_pow2_at_least(p.NT, 2),
                                        QMAX=quant["QMAX"], RCP=quant["RCP"], FP8=quant["QUANT"] == 2,
                                        BLOCK=p.BM * p.D1 * p.D2, FAST=quant["FAST"], num_warps=p.num_warps)
