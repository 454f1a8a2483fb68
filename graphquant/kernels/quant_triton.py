"""Triton kernels behind the lowered linears (CUDA only; ``triton`` is imported lazily).

Eleven kernels, each with a launch wrapper that takes and returns torch tensors:

``quantize_rows``     activation quantization: float rows -> int8 / fp8 e4m3 codes and one fp32
                      scale per row (dynamic per-token), or codes under a given per-tensor scale
                      (static). Numerics are those of ``graphquant.quant.fake_quant``:
                      ``scale = max(amax / qmax, tiny)``, codes ``rint(x / scale)`` (half-even),
                      clamped; fp8 saturates at +-448 and rounds to nearest even.
``multiplier_flags``  for one static scale, which multiplier ``r`` (``RN(1/s)`` or a neighbour) gives every
                      16-bit input the codes of the correctly rounded ``x / s`` as ``RN(x · r)`` (one launch
                      checks all 65536 patterns); QuaRot's R4 prefill kernels then quantize with one multiply.
``wq_mm``             "skinny" matmul for decode-sized M: ``out = a @ dequant(w).T`` with the
                      weight streamed in its low-precision form (int8, fp8 e4m3 or int4 packed two
                      per byte with per-group scales / zero points), the activation either float
                      (weight-only: W8A16 / W4A16) or codes with per-row scales (W8A8). Split-K
                      keeps every SM busy when M and N are small: each split stores its fp32 partial
                      sums in a workspace that the output tile's last split adds up in split order
                      (``LAST_SPLIT_SUMS``; else a ``split_sum`` launch): deterministic, no zero-filling.
``gemv``              decode (M <= 4) on CUDA cores: every weight byte read once for all rows,
                      int4 nibbles turned into floats by bit operations, optional split-K.
``gemv_packed``       weight-only decode (M <= 4, float activations, int8 or int4 weights): the weight
                      read as int32 words, codes turned into floats from their bits in place.
``w4_mma``            W4A16 at decode-sized M (<= 16) on tensor cores with the weight as the left operand
                      ("swap AB"), nibbles turned into 16-bit floats from their bits, group scales applied
                      to each group's partial product.
``w4_f16mma``         W4A16 at decode-sized M on the 16-bit tensor cores with the weight as the right operand
                      (``w8_mma``'s structure): low and high nibbles turned into ``u - 8`` in the activation's
                      dtype by PTX, two dots per group (even / odd activation columns); where the measured
                      table names it (on the H200: W4A16 at 16 rows, and gate/up at one row).
``w4_i8mma``          W4A16 at one to four rows on the int8 tensor cores: ``int8_pieces_kernel`` splits each
                      activation row per group into four exact int8 pieces under a power-of-two scale (one
                      launch per product), the nibbles go into the MMA as int8 codes, four groups per step in
                      one 16-row MMA tile; int32 sums exact per group (on the H200: gate|up and down at one row).
``w8_mma``            W8A16 at decode-sized M on the fp16 tensor cores, exact: the activation tile as fp16
                      under a power-of-two scale per row, the int8 codes as fp16 from their bits (where the
                      measured table names it: on the H200 every shape at 16 rows and gate/up at one row).
``scale_epilogue``    ``out = acc * sa * sw (+ bias)`` for the int32 result of ``torch._int_mm``.
``dequantize_weight`` int8 / int4-packed weight -> float (the prefill path feeds it to cuBLAS).

Integer / layout conventions (shared with ``graphquant.lowering.layouts``): int4 codes are stored
as unsigned nibbles ``u`` (signed codes shifted by 8), two per byte, the low nibble holding the
even column: ``byte[n, j] = u[n, 2j] | u[n, 2j+1] << 4``; the weight is ``(u - z) * s`` with ``z``
the (shifted) zero point per group, 8 when none is stored.

``decode_mm`` picks ``gemv``, ``gemv_packed``, ``w4_mma`` or ``wq_mm`` (and their tiles) per shape from
``gemv_tuned.json``, the table ``benchmarks/decode_kernels.py`` measures on the GPU, or from heuristics;
where that table names torch's int4 kernel ("tinygemm"), ``QuantLinear`` runs it.

Import this module only where Triton exists (``graphquant.kernels.int8_mm.triton_kernels()``
does that check).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .int4_mm import ADD_NORM_MAX_K, add_norm_width_fits
from .int8_mm import GLU_BLOCK, M_BUCKETS, m_bucket  # noqa: F401  (the table's buckets, re-exported)

TINY_C: tl.constexpr = tl.constexpr(float(torch.finfo(torch.float32).tiny))
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: no inline PTX


@triton.jit
def _rint(v):
    """Round to nearest, ties to even (exact for |v| < 2^22; codes are clamped first)."""
    f = tl.floor(v)
    d = v - f
    tie = f + (f - 2.0 * tl.floor(f * 0.5))  # the even neighbour
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tie))


@triton.jit
def _rint_small(v):
    """Round to nearest, ties to even, for |v| < 2^22: adding 1.5 * 2^23 leaves no fraction bits (two adds)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _round_e4m3(v):
    """Round (already saturated) fp32 ``v`` onto the fp8 e4m3 grid, ties to even, so the final cast is
    exact whatever rounding the conversion instruction uses."""
    bits = v.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)  # subnormal range of e4m3 shares the step of the smallest binade
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    r = _rint(v / step) * step
    # a negative v that rounds to zero gives -0, as round-to-nearest-even (the FAST conversion, torch's cast) does
    return tl.where(r == 0.0, v * 0.0, r)


@triton.jit
def _div_rn_by(x, s, LIMIT: tl.constexpr):
    """``x / s`` correctly rounded (what ``div.rn`` gives) wherever ``|x / s| <= LIMIT``, for ``s`` one normal
    fp32 scale (a scalar or one per row; at least 2^-126: dynamic scales are clamped to it, and a calibrated
    static scale below it would belong to an all-zero activation) and fp32 ``x`` of any value.

    ``r = RN(1/s)`` once per scale, ``q0 = RN(x·r)`` (within 1.5 ulp of ``x / s``), then two residual
    corrections ``q = RN(q + r·(x - s·q))``, each residual exact by FMA: after the first, ``q`` is within one ulp,
    and Markstein's theorem (``r`` within half an ulp of ``1/s``, ``q`` within one ulp of ``x/s``) makes the
    second one correctly rounded. Where the corrected ``q`` is NaN or beyond ``LIMIT`` (an infinite ``x`` or
    ``s``, NaN, overflow) ``q0`` is returned, which is then NaN where ``x / s`` is and otherwise on the same side
    of the callers' clamp (``±QMAX``, ``LIMIT = 2·QMAX``). Where ``q`` is zero ``q0`` is returned too: the
    corrections turn ``x = -0`` into ``+0``, and ``q0`` (a zero or a tiny quotient) carries the sign that
    round-to-nearest gives the code (``-0`` in fp8, as torch's cast). 8 instructions per element where ``div.rn``
    takes about 10 and a range check (``tests/test_fast_codes.py`` replays the sequence in exact arithmetic)."""
    r = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    q0 = libdevice.mul_rn(x, r)  # mul.rn: never contracted into a neighbouring add
    q = tl.fma(tl.fma(-q0, s, x), r, q0)
    q = tl.fma(tl.fma(-q, s, x), r, q)
    return tl.where((tl.abs(q) <= LIMIT) & (q != 0.0), q, q0)


@triton.jit
def codes(x, scale, QMAX: tl.constexpr, FP8: tl.constexpr, FAST: tl.constexpr = False):
    """fp32 ``x`` under ``scale`` -> int8 / fp8 e4m3 codes: ``x / scale`` (correctly rounded), clamped to
    ``±QMAX``, rounded half-to-even (fake-quant's numerics; shared by every quantizing kernel).

    ``FAST`` (GPU only, :func:`fast_codes`): the same codes in fewer instructions: the quotient by
    :func:`_div_rn_by`, the rounding by the conversion instructions themselves (``cvt.rni`` for int8,
    ``cvt.rn.satfinite.e4m3x2.f32`` for fp8, round-to-nearest-even in hardware on the sm_89+ GPUs that have
    fp8) instead of the bit-level grid rounding that Triton's CPU interpreter needs."""
    return _clamp_round(_quotient(x, scale, QMAX, FAST), QMAX, FP8, FAST)


@triton.jit
def _quotient(x, scale, QMAX: tl.constexpr, FAST: tl.constexpr):
    if FAST:
        v = _div_rn_by(x, scale, 2.0 * QMAX)
    else:
        v = tl.math.div_rn(x, scale)
    return v


@triton.jit
def _clamp_round(v, QMAX: tl.constexpr, FP8: tl.constexpr, FAST: tl.constexpr):
    """The codes of the quotient ``v``: clamped to ``±QMAX``, rounded half-to-even, converted."""
    v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
    # one return: Triton checks every return statement's type, also those of a constexpr branch not taken
    if FP8:
        if FAST:
            q = v.to(tl.float8e4nv)
        else:
            q = _round_e4m3(v).to(tl.float8e4nv)
    else:
        if FAST:
            q = libdevice.rint(v).to(tl.int8)
        else:
            q = _rint(v).to(tl.int8)
    return q


@triton.jit
def codes_by(x, rm, QMAX: tl.constexpr, FP8: tl.constexpr, FAST: tl.constexpr = False):
    """:func:`codes` under a static scale through its verified multiplier ``rm`` (:func:`static_multiplier`, not
    zero): the quotient is one rounded product ``x · rm``, which the check launch found to give :func:`codes`'
    codes for every finite input of the activation's dtype (clamped and rounded as there, so inf and NaN inputs get
    the codes the exact sequence gives them too)."""
    return _clamp_round(x * rm, QMAX, FP8, FAST)


#: programs of :func:`multiplier_check_kernel` (each checks 65536 / ``MUL_CHECKS`` 16-bit inputs) and so the flags
#: a kernel that takes a static multiplier reads
MUL_CHECKS: tl.constexpr = tl.constexpr(64)


@triton.jit
def _mul_candidate(s, K: tl.constexpr):
    """Candidate ``K`` for the multiplier of the static scale ``s``: ``RN(1/s)`` and its two fp32 neighbours."""
    r = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    if K == 1:
        r = (r.to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True)
    elif K == 2:
        r = (r.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True)
    return r


@triton.jit
def multiplier_check_kernel(S, FLAGS, QMAX: tl.constexpr, FP8: tl.constexpr, IN_FP16: tl.constexpr,
                            FAST: tl.constexpr = False):
    """For the static scale at ``S`` and one share of the 65536 bf16 (``IN_FP16``: fp16) bit patterns: bit ``k`` of
    ``FLAGS[program]`` set where some finite input's code under candidate ``k`` (:func:`_mul_candidate`) differs
    from :func:`codes`' (one launch of ``MUL_CHECKS`` programs; :func:`static_multiplier` reads the flags)."""
    BLOCK: tl.constexpr = 65536 // MUL_CHECKS
    bits = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if IN_FP16:
        y = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:  # a bf16 value is the upper half of its fp32 one (an int16 -> bf16 bitcast gave wrong values on the
        # H200's Triton 3.6: every scale failed every candidate there)
        y = (bits << 16).to(tl.float32, bitcast=True)
    s = tl.load(S).to(tl.float32)
    want = codes(y, s, QMAX, FP8, FAST).to(tl.int8, bitcast=True)
    finite = tl.abs(y) < float("inf")
    flag = 0
    for k in tl.static_range(3):
        got = _clamp_round(y * _mul_candidate(s, k), QMAX, FP8, FAST).to(tl.int8, bitcast=True)
        flag = flag | (tl.max((finite & (got != want)).to(tl.int32), axis=0) << k)
    tl.store(FLAGS + tl.program_id(0), flag)


@triton.jit
def static_multiplier(flags_ptr, s):
    """The multiplier :func:`codes_by` uses for the static scale ``s``: the first candidate no share of the check
    flagged, else 0.0 (:func:`codes`' quotient then)."""
    f = tl.load(flags_ptr + tl.arange(0, MUL_CHECKS))
    rm = tl.where(tl.max((f >> 2) & 1, axis=0) == 0, _mul_candidate(s, 2), 0.0)
    rm = tl.where(tl.max((f >> 1) & 1, axis=0) == 0, _mul_candidate(s, 1), rm)
    return tl.where(tl.max(f & 1, axis=0) == 0, _mul_candidate(s, 0), rm)


def multiplier_flags(static_scale: torch.Tensor, fp8: bool, dtype: torch.dtype) -> torch.Tensor | None:
    """The check launch for a static scale (a one-element fp32 tensor) and activations of ``dtype``: its flags
    (int32, ``MUL_CHECKS``), or None for a dtype with more than 65536 values (fp32: no multiplier)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    flags = torch.empty(MUL_CHECKS, dtype=torch.int32, device=static_scale.device)
    qmax = FP8_MAX if fp8 else 127.0
    multiplier_check_kernel[(MUL_CHECKS,)](static_scale, flags, QMAX=qmax, FP8=fp8, IN_FP16=dtype == torch.float16,
                                           FAST=fast_codes(), num_warps=4)
    return flags


@triton.jit
def quant_rows_kernel(X, Q, S, SCALE_IN, K, stride_xm, stride_qm,
                      QMAX: tl.constexpr, RCP: tl.constexpr, FP8: tl.constexpr, STATIC: tl.constexpr,
                      BLOCK: tl.constexpr, FAST: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    xp = X + row * stride_xm
    qp = Q + row * stride_qm
    offs0 = tl.arange(0, BLOCK)
    if STATIC:
        scale = tl.load(SCALE_IN).to(tl.float32)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + offs0
            x = tl.load(xp + offs, mask=offs < K, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(x))
        amax = tl.max(acc, axis=0)
        # torch on CUDA divides by a Python scalar as a multiply by its fp32 reciprocal: do the same
        scale = tl.maximum(amax * RCP, TINY_C)
        tl.store(S + row, scale)
    for k0 in range(0, K, BLOCK):
        offs = k0 + offs0
        x = tl.load(xp + offs, mask=offs < K, other=0.0).to(tl.float32)
        tl.store(qp + offs, codes(x, scale, QMAX, FP8, FAST), mask=offs < K)

@triton.jit
def tile_amax_kernel(X, AMAX, K, stride_xm, T, BLOCK: tl.constexpr):
    """``AMAX[row, t]`` = max |x| over tile ``t`` (``BLOCK`` elements) of row ``row``: the first of
    :func:`quantize_rows`'s two launches for a few long rows."""
    row = tl.program_id(0)
    t = tl.program_id(1)
    offs = t * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + row.to(tl.int64) * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
    tl.store(AMAX + row * T + t, tl.max(tl.abs(x), axis=0))


@triton.jit
def tile_quant_kernel(X, Q, S, AMAX, K, stride_xm, stride_qm, T, T_PAD: tl.constexpr,
                      QMAX: tl.constexpr, RCP: tl.constexpr, FP8: tl.constexpr, BLOCK: tl.constexpr,
                      FAST: tl.constexpr = False):
    """The second launch: tile ``t`` of row ``row`` quantized under the row's scale from the tiles' maxima,
    as ``quant_rows_kernel`` computes it (tile 0 stores the scale)."""
    row = tl.program_id(0)
    t = tl.program_id(1)
    tiles = tl.arange(0, T_PAD)
    amax = tl.max(tl.load(AMAX + row * T + tiles, mask=tiles < T, other=0.0), axis=0)
    scale = tl.maximum(amax * RCP, TINY_C)
    tl.store(S + row, scale, mask=t == 0)
    offs = t * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + row.to(tl.int64) * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
    tl.store(Q + row.to(tl.int64) * stride_qm + offs, codes(x, scale, QMAX, FP8, FAST), mask=offs < K)


@triton.jit
def _scale_columns(out, SW, rn, n_ok, W_SCALE: tl.constexpr):
    """The (BM, BN) tile ``out`` times the weight scale: one per output column ``rn`` (``W_SCALE`` 1) or one."""
    if W_SCALE == 1:
        out = out * tl.load(SW + rn, mask=n_ok, other=0.0)[None, :]
    else:
        out = out * tl.load(SW)
    return out


@triton.jit
def _bias(BIAS, rn, n_ok, pid_k, FIRST_SPLIT_ONLY: tl.constexpr):
    """fp32 bias of the columns ``rn``; with split-K only split 0 adds it (the splits' partial sums are added up
    afterwards, so each other split contributes zero)."""
    b = tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)
    if FIRST_SPLIT_ONLY:
        b = tl.where(pid_k == 0, b, 0.0)
    return b


@triton.jit
def _split_rows(C, pid_k, M, stride_cm):
    """Where split ``pid_k`` writes: its own (M, N) slice of the (SPLIT_K, M, N) fp32 workspace (the result
    itself when there is one split, pid_k = 0)."""
    return C + pid_k.to(tl.int64) * M * stride_cm


@triton.jit
def _split_range(pid_k, total, SPLIT_K, STEP: tl.constexpr):
    """[lo, hi) of split ``pid_k`` along the reduced dimension: ``total`` cut into ``SPLIT_K`` chunks whose length
    is a multiple of ``STEP`` (the loop step), the last one clipped (empty splits get lo >= hi)."""
    per = tl.cdiv(tl.cdiv(total, SPLIT_K), STEP) * STEP
    lo = pid_k * per
    return lo, tl.minimum(lo + per, total)


@triton.jit
def split_sum_kernel(P, C, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """``C = sum_s P[s]`` over the splits of a (SPLIT, M, N) fp32 workspace, in split order, cast to C's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.load(P + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(P + s * MN + offs, mask=ok, other=0.0)
    tl.store(C + offs, acc.to(C.dtype.element_ty), mask=ok)


@triton.jit
def last_to_arrive(COUNT, idx, n):
    """Called once by each of the ``n`` programs of group ``idx`` after they stored their results: True in the
    one that arrives last at counter ``COUNT[idx]`` (acquire-release: every other program's stores come before
    its loads). That program finishes the group's work and sets the counter back to zero
    (``tl.atomic_xchg(COUNT + idx, 0)``) for the next launch (:func:`tile_counters`)."""
    tl.debug_barrier()  # every thread's results are stored before the count releases them
    return tl.atomic_add(COUNT + idx, 1, sem="acq_rel", scope="gpu") == n - 1


@triton.jit
def _last_split_sums(C, OUT, COUNT, tile, rm, rn, M, N, stride_cm, SPLIT_K, GLU: tl.constexpr = False):
    """Split-K without a second launch: called by every split of output tile ``tile`` (rows ``rm``, columns
    ``rn``) after it stored its partial sums to its slice of the fp32 workspace ``C``. The split that arrives
    last at the tile's counter (acquire-release: every other split's stores come before its loads) adds the
    slices up in split order, as ``split_sum_kernel`` does, stores the result to ``OUT`` (M, N) (``GLU``: the
    tile's ``silu(gate) * up`` to ``OUT`` (M, N / 2), :func:`_glu_tile`) and sets the counter back to zero for the
    next launch."""
    if last_to_arrive(COUNT, tile, SPLIT_K):
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        offs = rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
        acc = tl.load(C + offs, mask=mask, other=0.0, cache_modifier=".cg")
        for s in range(1, SPLIT_K):
            acc += tl.load(C + s * M * stride_cm + offs, mask=mask, other=0.0, cache_modifier=".cg")
        if GLU:
            h, rh, h_ok = _glu_tile(acc, rn, N, OUT.dtype.element_ty)
            tl.store(OUT + rm.to(tl.int64)[:, None] * (N // 2) + rh[None, :], h.to(OUT.dtype.element_ty),
                     mask=(rm < M)[:, None] & h_ok[None, :])
        else:
            tl.store(OUT + rm.to(tl.int64)[:, None] * N + rn[None, :], acc.to(OUT.dtype.element_ty), mask=mask)
        tl.atomic_xchg(COUNT + tile, 0)


#: a fused gate|up projection whose rows ``generation.prepare`` interleaved in blocks of ``GLU_BLOCK``
#: (``int8_mm.interleaved_glu``) hands a decode kernel output tiles that hold whole (gate, up) pairs: with
#: ``glu=True`` the kernel stores ``silu(gate) * up`` ((M, N / 2)) itself
_GLU_BLOCK = tl.constexpr(GLU_BLOCK)


@triton.jit
def _rounded(x, DT: tl.constexpr):
    """fp32 ``x`` rounded to ``DT`` (to nearest even) and back to fp32; bf16 by its bits, as Triton's CPU
    interpreter truncates in ``.to(bfloat16)``."""
    if DT == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        return ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(DT).to(tl.float32)


@triton.jit
def _glu_tile(out, rn, N, DT: tl.constexpr):
    """``silu(gate) * up`` of an fp32 output tile ``out`` (BM, BN) of gate|up rows interleaved in ``GLU_BLOCK``
    blocks (columns ``rn``, a whole number of block pairs): the products rounded to ``DT`` first (the output the
    separate path hands the SiLU·mul), then ``g * sigmoid(g) * u`` in fp32, rounded to ``DT`` once (as
    Inductor's fused SiLU·mul kernel computes it). Returns the (BM, BN / 2) result, its columns in the (M, N / 2)
    output and their mask."""
    BM: tl.constexpr = out.shape[0]
    BN: tl.constexpr = out.shape[1]
    G: tl.constexpr = _GLU_BLOCK
    x = tl.reshape(_rounded(out, DT), (BM, BN // (2 * G), 2, G))
    g, u = tl.split(tl.permute(x, (0, 1, 3, 2)))
    h = tl.reshape(_rounded(g * tl.sigmoid(g) * u, DT), (BM, BN // 2))
    cg, _ = tl.split(tl.permute(tl.reshape(rn, (BN // (2 * G), 2, G)), (0, 2, 1)))
    rh = tl.reshape((cg // (2 * G)) * G + cg % G, (BN // 2,))
    return h, rh, rh < N // 2


@triton.jit
def _mm_tile(M, N, K, SPLIT_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A program's output tile and K range in :func:`wq_mm_kernel` / :func:`w8_mma_kernel` (grid: tiles, splits):
    (tile, split, rows, columns, row mask, column mask, K start, K end)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    rm = (pid // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo, k_hi = _split_range(pid_k, K, SPLIT_K, BLOCK_K)
    return pid, pid_k, rm, rn, rm < M, rn < N, k_lo, k_hi


@triton.jit
def _mm_store(out, BIAS, C, OUT, COUNT, pid, pid_k, rm, rn, m_ok, n_ok, M, N, stride_cm, SPLIT_K,
              HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, LAST_SUMS: tl.constexpr, GLU: tl.constexpr = False):
    """The fp32 tile ``out`` plus the bias (split 0 only with split-K) to the program's output slice; with
    ``LAST_SUMS`` the tile's last split adds the slices up (:func:`_last_split_sums`). ``GLU`` (one split, or
    ``LAST_SUMS``): the result is the tile's ``silu(gate) * up`` (:func:`_glu_tile`), (M, N / 2)."""
    if HAS_BIAS:
        out = out + _bias(BIAS, rn, n_ok, pid_k, PARTIAL)[None, :]
    if GLU and not PARTIAL:
        h, rh, h_ok = _glu_tile(out, rn, N, C.dtype.element_ty)
        tl.store(C + rm[:, None] * stride_cm + rh[None, :], h.to(C.dtype.element_ty),
                 mask=m_ok[:, None] & h_ok[None, :])
    else:
        c_ptrs = _split_rows(C, pid_k, M, stride_cm) + rm[:, None] * stride_cm + rn[None, :]
        tl.store(c_ptrs, out.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
        if LAST_SUMS:
            _last_split_sums(C, OUT, COUNT, pid, rm, rn, M, N, stride_cm, SPLIT_K, GLU)


@triton.jit
def _codes_dot_swapped(A, B, rm, rn, m_ok, n_ok, k_lo, k_hi, K, stride_am, stride_bn, INT_ACC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (BLOCK_N, BLOCK_M) product ``B[rn] @ A[rm].T`` of 8-bit weight codes and 8-bit activation codes over
    ``[k_lo, k_hi)``, the weight tile as the left operand (``wq_mm_kernel``'s ``SWAP``). fp8 products are summed by
    the tensor core in its own reduced precision over each ``BLOCK_K`` step (as cuBLAS's fp8 fast-accumulation
    mode), then added to the fp32 sums: on the H200 within 1.8e-4 of the largest output at K = 4096, below the
    3.9e-3 rounding of the bf16 result (adding every 32-long step's sum to the fp32 sums instead,
    ``max_num_imprecise_acc=32``, still left 4.5e-5 and was 0.4-1.8 us slower per product,
    ``benchmarks/results/decode_kernels_w8a8_swap.json``). int8 sums are exact."""
    if INT_ACC:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a_ptrs = A + rm[:, None] * stride_am + rk[None, :]
        w_ptrs = B + rn[:, None] * stride_bn + rk[None, :]
        if INT_ACC:
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0)
            acc_t += tl.dot(w, tl.trans(a), out_dtype=tl.int32)
        else:
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc_t += tl.dot(w, tl.trans(a))
    return acc_t


@triton.jit
def wq_mm_kernel(A, B, SW, ZW, SA, BIAS, C, OUT, COUNT,
                 M, N, K, GROUP, stride_am, stride_bn, stride_cm, stride_sw,
                 A_KIND: tl.constexpr,   # 0 float, 1 int8 codes, 2 fp8 codes
                 W_KIND: tl.constexpr,   # 0 int8, 1 fp8 e4m3, 2 int4 nibble-packed
                 W_SCALE: tl.constexpr,  # 0 one scale, 1 per output channel, 2 per group
                 HAS_ZERO: tl.constexpr, SA_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT_K, PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, LAST_SUMS: tl.constexpr = False, SWAP: tl.constexpr = False,
                 GLU: tl.constexpr = False):
    """``LAST_SUMS`` (with split-K): the tile's last split adds the partial sums up into ``OUT``
    (:func:`_last_split_sums`) instead of a :func:`split_sum` launch. ``SWAP`` (8-bit codes times 8-bit codes
    only): the product is computed transposed, the weight tile as the left operand (``BLOCK_N`` rows, 64 or 128)
    and the activation rows as the right one, so that sm_90 runs it as a warpgroup MMA on the codes themselves
    (fp8 ``QGMMA``, int8 ``IGMMA``), where a 16-row left operand takes the warp-level MMA, on which fp8 codes are
    first widened to fp16 (``F2FP``): 1.67 instructions per weight element in the main loop for fp8 against 0.73 for
    int8 (``benchmarks/kernel_sass.py``); fp8 sums: see :func:`_codes_dot_swapped`."""
    pid, pid_k, rm, rn, m_ok, n_ok, k_lo, k_hi = _mm_tile(M, N, K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K)
    INT_ACC: tl.constexpr = (A_KIND == 1) and (W_KIND == 0)
    if SWAP:
        tl.static_assert(A_KIND != 0 and W_KIND != 2, "SWAP is for 8-bit codes times 8-bit codes")
        acc = tl.trans(_codes_dot_swapped(A, B, rm, rn, m_ok, n_ok, k_lo, k_hi, K, stride_am, stride_bn, INT_ACC,
                                          BLOCK_M, BLOCK_N, BLOCK_K))
    else:
        if INT_ACC:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if A_KIND == 0 and W_SCALE == 1:
            sw_n = tl.load(SW + rn, mask=n_ok, other=0.0)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            a_mask = m_ok[:, None] & k_ok[None, :]
            if A_KIND == 1:
                a = tl.load(A + rm[:, None] * stride_am + rk[None, :], mask=a_mask, other=0)
            else:
                a = tl.load(A + rm[:, None] * stride_am + rk[None, :], mask=a_mask, other=0.0)
            if W_KIND == 2:
                rh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                p = tl.load(B + rn[:, None] * stride_bn + rh[None, :],
                            mask=n_ok[:, None] & (rh[None, :] < K // 2), other=0)
                u = tl.interleave(p & 0xF, p >> 4).to(tl.float32)
                g = k0 // GROUP
                s = tl.load(SW + rn * stride_sw + g, mask=n_ok, other=0.0)
                if HAS_ZERO:
                    z = tl.load(ZW + rn * stride_sw + g, mask=n_ok, other=0).to(tl.float32)
                    wf = (u - z[:, None]) * s[:, None]
                else:
                    wf = (u - 8.0) * s[:, None]
                wt = tl.trans(wf.to(A.dtype.element_ty))
            else:
                w_mask = n_ok[None, :] & k_ok[:, None]
                if W_KIND == 0:
                    wt = tl.load(B + rn[None, :] * stride_bn + rk[:, None], mask=w_mask, other=0)
                else:
                    wt = tl.load(B + rn[None, :] * stride_bn + rk[:, None], mask=w_mask, other=0.0)
                if A_KIND == 0:  # weight-only: dequantize in registers exactly as fake-quant does
                    if W_SCALE == 1:
                        wt = (wt.to(tl.float32) * sw_n[None, :]).to(A.dtype.element_ty)
                    else:
                        wt = (wt.to(tl.float32) * tl.load(SW)).to(A.dtype.element_ty)
            if INT_ACC:
                acc += tl.dot(a, wt, out_dtype=tl.int32)
            else:
                acc += tl.dot(a, wt)
    out = acc.to(tl.float32)
    if A_KIND != 0:
        if SA_ROW:
            out = out * tl.load(SA + rm, mask=m_ok, other=0.0)[:, None]
        else:
            out = out * tl.load(SA)
        out = _scale_columns(out, SW, rn, n_ok, W_SCALE)
    _mm_store(out, BIAS, C, OUT, COUNT, pid, pid_k, rm, rn, m_ok, n_ok, M, N, stride_cm, SPLIT_K, HAS_BIAS,
              PARTIAL, LAST_SUMS, GLU)

@triton.jit
def _nibbles_minus(p, z):
    """Unsigned nibbles of the packed bytes ``p`` as fp32 ``u - z`` (low nibbles, high nibbles), built
    from the bits (``2^23 + u``) instead of an int->float conversion, which runs at a quarter of the
    FMA rate on NVIDIA GPUs and would bound a 4-bit GEMV below the memory bandwidth."""
    pi = p.to(tl.int32)
    lo = ((pi & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + z)
    hi = (((pi >> 4) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + z)
    return lo, hi


@triton.jit
def gemv_kernel(A, B, SW, ZW, SA, BIAS, C, M, N, K, GROUP, stride_am, stride_bn, stride_cm, stride_sw,
                A_KIND: tl.constexpr, W_KIND: tl.constexpr, W_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr,
                SA_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GPT: tl.constexpr, SPLIT_K: tl.constexpr):
    """``C[:M] = A[:M] @ dequant(B).T`` for decode (M <= BLOCK_M <= 4 rows), on CUDA cores.

    Program (pid_n, pid_k) streams the weight rows ``BLOCK_N * pid_n + [0, BLOCK_N)`` over its share of
    K exactly once, in storage format, for all M activation rows. 8-bit products accumulate element-wise
    and are summed once after the loop (int8 codes times int8 codes in int32); int4 products are summed
    per group of ``GROUP`` columns, whose scale is applied once per group and row. With ``SPLIT_K > 1``
    each split stores its partial sums in its slice of an fp32 workspace (scales and bias are
    linear, so each split applies them to its part; the bias only in split 0)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    a_rows = A + rm.to(tl.int64)[:, None] * stride_am
    k_lo, k_hi = _split_range(pid_k, K, SPLIT_K, BLOCK_K)
    INT_ACC: tl.constexpr = (A_KIND == 1) and (W_KIND == 0)
    if INT_ACC:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_hi
        x_mask = m_ok[:, None] & k_ok[None, :]
        if INT_ACC:
            x = tl.load(a_rows + rk[None, :], mask=x_mask, other=0).to(tl.int32)
        elif A_KIND == 1:
            x = tl.load(a_rows + rk[None, :], mask=x_mask, other=0).to(tl.float32)
        else:
            x = tl.load(a_rows + rk[None, :], mask=x_mask, other=0.0).to(tl.float32)
        if W_KIND == 2:
            HALF: tl.constexpr = BLOCK_K // 2
            rh = k0 // 2 + tl.arange(0, HALF)
            p = tl.load(B + rn64[:, None] * stride_bn + rh[None, :],
                        mask=n_ok[:, None] & (rh[None, :] < (k_hi + 1) // 2), other=0)
            xe, xo = tl.split(tl.reshape(x, (BLOCK_M, HALF, 2)))  # even / odd columns
            g = k0 // GROUP + tl.arange(0, GPT)
            g_mask = n_ok[:, None] & (g[None, :] < tl.cdiv(K, GROUP))
            s = tl.load(SW + rn64[:, None] * stride_sw + g[None, :], mask=g_mask, other=0.0)  # (BN, GPT)
            if HAS_ZERO:
                z = tl.load(ZW + rn64[:, None] * stride_sw + g[None, :], mask=g_mask, other=8).to(tl.float32)
                zf = tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, GPT, HALF // GPT)), (BLOCK_N, HALF))
                lo, hi = _nibbles_minus(p, zf)
            else:
                lo, hi = _nibbles_minus(p, 8.0)
            # (BM, BN, HALF) products, summed per group -> (BM, BN, GPT), scaled, summed
            prod = lo[None, :, :] * xe[:, None, :] + hi[None, :, :] * xo[:, None, :]
            d = tl.sum(tl.reshape(prod, (BLOCK_M, BLOCK_N, GPT, HALF // GPT)), axis=3)
            acc += tl.sum(d * s[None, :, :], axis=2)
        else:
            w_mask = n_ok[:, None] & k_ok[None, :]
            if W_KIND == 0:
                w = tl.load(B + rn64[:, None] * stride_bn + rk[None, :], mask=w_mask, other=0)
                if INT_ACC:
                    w = w.to(tl.int32)
                else:
                    w = w.to(tl.float32)
            else:
                w = tl.load(B + rn64[:, None] * stride_bn + rk[None, :], mask=w_mask, other=0.0).to(tl.float32)
            acc3 += w[None, :, :] * x[:, None, :]  # summed once, after the loop
    if W_KIND != 2:
        acc = tl.sum(acc3, axis=2)
    out = acc.to(tl.float32)
    if W_KIND != 2:
        out = _scale_columns(out, SW, rn, n_ok, W_SCALE)
    if A_KIND != 0:
        if SA_ROW:
            out = out * tl.load(SA + rm, mask=m_ok, other=0.0)[:, None]
        else:
            out = out * tl.load(SA)
    if HAS_BIAS:
        out = out + _bias(BIAS, rn, n_ok, pid_k, SPLIT_K > 1)[None, :]
    c_ptrs = _split_rows(C, pid_k, M, stride_cm) + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(c_ptrs, out.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _byte_f32(w, SHIFT: tl.constexpr):
    """Byte ``SHIFT // 8`` (0 or 1) of each int32 word whose bytes were offset by 128 (``w ^ 0x80808080``),
    as the fp32 ``(byte - 128) * 2^SHIFT``: built from the bits, exact (all values < 2^24)."""
    return ((w & (0xFF << SHIFT)) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + 128.0 * (1 << SHIFT))


@triton.jit
def _nibble_f32(w, SHIFT: tl.constexpr, z):
    """Nibble ``SHIFT // 4`` (0..3) of each int32 word as the fp32 ``(u - z) * 2^SHIFT``, exact."""
    return ((w & (0xF << SHIFT)) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + z * (1 << SHIFT))


@triton.jit
def _x(xp, j: tl.constexpr, mask, SCALE: tl.constexpr):
    """Activations ``xp[j]`` (one row, one per word) as fp32 times ``SCALE`` (a power of two), as (1, BQ)."""
    return (tl.load(xp + j, mask=mask, other=0.0).to(tl.float32) * SCALE)[None, :]


@triton.jit
def _w8_row(f0, f1, f2, f3, xp, mask):
    """One activation row against the decoded bytes of int8 words: (BN, BQ) partial products."""
    return (f0 * _x(xp, 0, mask, 1.0) + f1 * _x(xp, 1, mask, 1.0 / 256.0)
            + f2 * _x(xp, 2, mask, 1.0) + f3 * _x(xp, 3, mask, 1.0 / 256.0))


@triton.jit
def _w4_row(f0, f1, f2, f3, f4, f5, f6, f7, xp, mask):
    """One activation row against the decoded nibbles of int4 words: (BN, BQ) partial products."""
    return (f0 * _x(xp, 0, mask, 1.0) + f1 * _x(xp, 1, mask, 1.0 / 16.0) + f2 * _x(xp, 2, mask, 1.0 / 256.0)
            + f3 * _x(xp, 3, mask, 1.0 / 4096.0) + f4 * _x(xp, 4, mask, 1.0) + f5 * _x(xp, 5, mask, 1.0 / 16.0)
            + f6 * _x(xp, 6, mask, 1.0 / 256.0) + f7 * _x(xp, 7, mask, 1.0 / 4096.0))


@triton.jit
def _packed_store(acc, m, M, rn, n_ok, pid_k, SW, BIAS, C, stride_cm,
                  W_KIND: tl.constexpr, W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    out = tl.sum(acc, axis=1)
    if W_KIND == 0:
        if W_SCALE == 1:
            out = out * tl.load(SW + rn, mask=n_ok, other=0.0)
        else:
            out = out * tl.load(SW)
    if HAS_BIAS:
        out = out + _bias(BIAS, rn, n_ok, pid_k, SPLIT_K > 1)
    ptrs = _split_rows(C, pid_k, M, stride_cm) + m * stride_cm + rn
    mask = n_ok & (m < M)
    tl.store(ptrs, out.to(C.dtype.element_ty), mask=mask)


@triton.jit
def gemv_packed_kernel(A, B, SW, ZW, BIAS, C, OUT, COUNT, M, N, Q, stride_am, stride_bn, stride_cm, stride_sw,
                       GROUP: tl.constexpr, W_KIND: tl.constexpr, W_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr,
                       SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr, LAST_SUMS: tl.constexpr = False):
    """Weight-only decode GEMV (float activations, M <= BLOCK_M <= 4) reading the weight as int32 words.

    ``B`` is the weight viewed as int32 (N, Q): 4 int8 codes or 8 int4 nibbles (low first) per word, so
    every load is a wide one and a code becomes fp32 by two integer operations on its word and one
    subtraction (the bits ``2^23 + code * 2^s`` are a float; no int->float conversion, which runs at a
    quarter of the FMA rate). The code at bit ``s`` of its 16-bit half comes out scaled by ``2^s``, so the
    matching activation is multiplied by ``2^-s`` (exact) instead. The weight is decoded once per tile and
    used by every activation row (one 2-D accumulator per row: no 3-D layouts, no shared-memory shuffles
    in the loop); products are summed once after the loop; int4 group scales (and zero points) are
    gathered per word (a word never straddles a group: GROUP % 8 == 0). ``SPLIT_K > 1``: partial sums
    go to the split's slice of an fp32 workspace (:func:`split_sum` adds them up, or with ``LAST_SUMS`` the
    tile's last split: :func:`_last_split_sums`); the bias only in split 0.
    ``PREFETCH``: the next tile's words are loaded before this tile is decoded (register double-buffering, so
    every program keeps a load in flight while it computes)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    q_lo, q_hi = _split_range(pid_k, Q, SPLIT_K, BLOCK_Q)
    PER: tl.constexpr = 4 if W_KIND == 0 else 8
    acc0 = tl.zeros((BLOCK_N, BLOCK_Q), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_Q), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_Q), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_Q), dtype=tl.float32)
    w_ptrs = B + rn64[:, None] * stride_bn + tl.arange(0, BLOCK_Q)[None, :]
    if PREFETCH:
        rq0 = q_lo + tl.arange(0, BLOCK_Q)
        w_next = tl.load(w_ptrs + q_lo, mask=n_ok[:, None] & (rq0 < q_hi)[None, :], other=0)
    for q0 in range(q_lo, q_hi, BLOCK_Q):
        rq = q0 + tl.arange(0, BLOCK_Q)
        q_ok = rq < q_hi
        w_mask = n_ok[:, None] & q_ok[None, :]
        if PREFETCH:
            w = w_next
            w_next = tl.load(w_ptrs + (q0 + BLOCK_Q), mask=n_ok[:, None] & (rq + BLOCK_Q < q_hi)[None, :], other=0)
        else:
            w = tl.load(w_ptrs + q0, mask=w_mask, other=0)
        xp = A + PER * rq
        if W_KIND == 0:
            w = w ^ -2139062144  # 0x80808080: each signed byte b becomes the unsigned b + 128
            hi = w >> 16
            f0 = _byte_f32(w, 0)
            f1 = _byte_f32(w, 8)
            f2 = _byte_f32(hi, 0)
            f3 = _byte_f32(hi, 8)
            acc0 += _w8_row(f0, f1, f2, f3, xp, q_ok)
            if BLOCK_M > 1:
                acc1 += _w8_row(f0, f1, f2, f3, xp + stride_am, q_ok & (1 < M))
            if BLOCK_M > 2:
                acc2 += _w8_row(f0, f1, f2, f3, xp + 2 * stride_am, q_ok & (2 < M))
                acc3 += _w8_row(f0, f1, f2, f3, xp + 3 * stride_am, q_ok & (3 < M))
        else:
            g_off = rn64[:, None] * stride_sw + (rq * 8 // GROUP)[None, :]
            if HAS_ZERO:
                z = tl.load(ZW + g_off, mask=w_mask, other=8).to(tl.float32)
            else:
                z = 8.0
            hi = w >> 16
            f0 = _nibble_f32(w, 0, z)
            f1 = _nibble_f32(w, 4, z)
            f2 = _nibble_f32(w, 8, z)
            f3 = _nibble_f32(w, 12, z)
            f4 = _nibble_f32(hi, 0, z)
            f5 = _nibble_f32(hi, 4, z)
            f6 = _nibble_f32(hi, 8, z)
            f7 = _nibble_f32(hi, 12, z)
            s = tl.load(SW + g_off, mask=w_mask, other=0.0)
            acc0 += _w4_row(f0, f1, f2, f3, f4, f5, f6, f7, xp, q_ok) * s
            if BLOCK_M > 1:
                acc1 += _w4_row(f0, f1, f2, f3, f4, f5, f6, f7, xp + stride_am, q_ok & (1 < M)) * s
            if BLOCK_M > 2:
                acc2 += _w4_row(f0, f1, f2, f3, f4, f5, f6, f7, xp + 2 * stride_am, q_ok & (2 < M)) * s
                acc3 += _w4_row(f0, f1, f2, f3, f4, f5, f6, f7, xp + 3 * stride_am, q_ok & (3 < M)) * s
    _packed_store(acc0, 0, M, rn, n_ok, pid_k, SW, BIAS, C, stride_cm, W_KIND, W_SCALE, HAS_BIAS, SPLIT_K)
    if BLOCK_M > 1:
        _packed_store(acc1, 1, M, rn, n_ok, pid_k, SW, BIAS, C, stride_cm, W_KIND, W_SCALE, HAS_BIAS, SPLIT_K)
    if BLOCK_M > 2:
        _packed_store(acc2, 2, M, rn, n_ok, pid_k, SW, BIAS, C, stride_cm, W_KIND, W_SCALE, HAS_BIAS, SPLIT_K)
        _packed_store(acc3, 3, M, rn, n_ok, pid_k, SW, BIAS, C, stride_cm, W_KIND, W_SCALE, HAS_BIAS, SPLIT_K)
    if LAST_SUMS:
        _last_split_sums(C, OUT, COUNT, pid_n, tl.arange(0, BLOCK_M), rn, M, N, stride_cm, SPLIT_K)


@triton.jit
def _nibble_half(u, MAGIC: tl.constexpr, SUB: tl.constexpr, DT: tl.constexpr):
    """Nibbles ``u`` (int32, 0..15) as 16-bit floats ``u - 8``, exact, from their bits: ``MAGIC | u`` is the
    half / bfloat16 ``SUB - 8 + u`` (1024 + u in fp16, 128 + u in bf16), so one subtraction finishes it (no
    int->float conversion, which runs at a quarter of the FMA rate)."""
    return (u | MAGIC).to(tl.int16).to(DT, bitcast=True) - tl.full((1, 1), SUB, DT)


@triton.jit
def w4_mma_kernel(A, B, SW, ZW, BIAS, C, M, N, G, stride_am, stride_bn, stride_cm, stride_sw,
                  GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, FP16: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr):
    """W4A16 at decode-sized M (<= BLOCK_M = 16) on tensor cores, the weight as the *left* operand
    ("swap AB"): ``out.T (N, M) = W (N, K) @ a.T (K, M)``, so the N rows of the weight fill the MMA's M
    side and the few activation rows are its narrow N side.

    One loop step is one quantization group of ``BLOCK_N`` weight rows: ``GROUP / 2`` bytes per row. The low
    nibbles (even columns) and the high nibbles (odd columns) become 16-bit floats ``u - 8`` by bit operations
    (:func:`_nibble_half`) and meet the even and the odd activation columns in two dots, so the nibbles are
    never interleaved. The group's fp32 partial product is scaled per row (the group scale) and accumulated;
    a zero point ``z`` enters as ``-(z - 8) * sum(a over the group)``. ``SPLIT_K`` splits the groups, each
    split storing its partial sums in its slice of an fp32 workspace (:func:`split_sum`); the bias only in
    split 0. ``PREFETCH``: the next group's bytes are loaded before this group is decoded."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    HALF: tl.constexpr = GROUP // 2
    rb = tl.arange(0, HALF)
    g_lo, g_hi = _split_range(pid_k, G, SPLIT_K, 1)
    if FP16:
        DT: tl.constexpr = tl.float16
        MAGIC: tl.constexpr = 0x6400
        SUB: tl.constexpr = 1032.0
    else:
        DT: tl.constexpr = tl.bfloat16
        MAGIC: tl.constexpr = 0x4300
        SUB: tl.constexpr = 136.0
    w_ptrs = B + rn64[:, None] * stride_bn + rb[None, :]
    x_ptrs = A + rm.to(tl.int64)[None, :] * stride_am + 2 * rb[:, None]
    s_ptrs = SW + rn64 * stride_sw
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if PREFETCH:
        w_next = tl.load(w_ptrs + g_lo * HALF, mask=n_ok[:, None] & (g_lo * HALF + rb < g_hi * HALF)[None, :],
                         other=0)
    for g in range(g_lo, g_hi):
        if PREFETCH:
            w = w_next
            w_next = tl.load(w_ptrs + (g + 1) * HALF,
                             mask=n_ok[:, None] & ((g + 1) * HALF + rb < g_hi * HALF)[None, :], other=0)
        else:
            w = tl.load(w_ptrs + g * HALF, mask=n_ok[:, None], other=0)
        w = w.to(tl.int32) & 0xFF
        xe = tl.load(x_ptrs + g * GROUP, mask=m_ok[None, :], other=0.0)
        xo = tl.load(x_ptrs + (g * GROUP + 1), mask=m_ok[None, :], other=0.0)
        part = tl.dot(_nibble_half(w & 0xF, MAGIC, SUB, DT), xe)
        part = tl.dot(_nibble_half(w >> 4, MAGIC, SUB, DT), xo, part)
        if HAS_ZERO:
            z = tl.load(ZW + rn64 * stride_sw + g, mask=n_ok, other=8).to(tl.float32) - 8.0
            xsum = tl.sum(xe.to(tl.float32), axis=0) + tl.sum(xo.to(tl.float32), axis=0)
            part -= z[:, None] * xsum[None, :]
        acc += part * tl.load(s_ptrs + g, mask=n_ok, other=0.0)[:, None]
    if HAS_BIAS:
        acc = acc + _bias(BIAS, rn, n_ok, pid_k, SPLIT_K > 1)[:, None]
    c_ptrs = _split_rows(C, pid_k, M, stride_cm) + rm.to(tl.int64)[None, :] * stride_cm + rn[:, None]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _pow2_rows(amax, BIG: tl.constexpr):
    """(2^k, 2^-k) per row for rows whose largest magnitude is ``amax``: 2^k brings it into [2^14, 2^15)
    (``BIG = 127 + 14 + 127``); a zero row gets the largest k."""
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent; 0 for a zero row
    kb = tl.minimum(tl.maximum(BIG - e, 1), 253)  # biased exponent of 2^(14 - E)
    return (kb << 23).to(tl.float32, bitcast=True), ((254 - kb) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _f16_rows(a, BIG: tl.constexpr):
    """Float rows ``a`` (BM, BK) as fp16 times a power of two per row that brings the row's largest magnitude
    into [2^14, 2^15): exact for bf16 / fp16 inputs (8 / 11 significant bits) down to 2^-28 of that largest
    element (smaller ones round as fp16 subnormals). Returns (fp16 rows, fp32 2^-k per row to undo it)."""
    af = a.to(tl.float32)
    up, down = _pow2_rows(tl.max(tl.abs(af), axis=1), BIG)
    return (af * up[:, None]).to(tl.float16), down


@triton.jit
def _i8_f16(w, ASM: tl.constexpr):
    """int8 codes as exact fp16 from their bits: the byte ``b ^ 0x80`` (= b + 128) under the exponent byte
    ``0x64`` is the fp16 ``1152 + b`` (b in [-128, 127]), less 1152. ``ASM``: four codes (one 32-bit register of
    the dot operand's layout) in five instructions: a xor, two byte permutes, two paired fp16 subtractions
    (``benchmarks/kernel_sass.py``: 3.6 instructions per weight element in the W8A16 loop, against 5.0 for the
    same bits built by Triton's integer ops). Without ``ASM`` (Triton's CPU interpreter runs no PTX) the same bits
    element by element."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t, c; xor.b32 t, $2, 0x80808080; mov.b32 c, 0x64806480;"
            " prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342;"
            " sub.f16x2 $0, $0, c; sub.f16x2 $1, $1, c; }",
            "=r,=r,r", [w], dtype=tl.float16, is_pure=True, pack=4)
    return (w.to(tl.int16) + 0x6480).to(tl.int16).to(tl.float16, bitcast=True) - 1152.0


@triton.jit
def w8_mma_kernel(A, B, SW, BIAS, C, OUT, COUNT, M, N, K, stride_am, stride_bn, stride_cm,
                  W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K, PARTIAL: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  LAST_SUMS: tl.constexpr = False, ASM: tl.constexpr = True, ONE_SCALE: tl.constexpr = False,
                  GLU: tl.constexpr = False):
    """W8A16 at decode-sized M on the fp16 tensor cores, exact: ``C = A @ (B * SW).T (+ BIAS)`` with A float
    (M, K) and B int8 codes (N, K). Each K tile of the activation becomes fp16 under a power-of-two scale per row
    (:func:`_f16_rows`) and the codes become fp16 from their bits (:func:`_i8_f16`): every product is exact
    and the tile's fp32 sum is scaled back (exactly) into the fp32 accumulator; the weight scale comes last, per
    column. The same structure as the fp8 W8A8 kernel at 16 rows (fp8 codes turned into fp16 in registers),
    which streams the gate|up weight at 3.9 TB/s on the H200. Split-K as :func:`wq_mm_kernel`. ``ONE_SCALE`` (a
    tile option): one power of two per row for the program's whole K range (a first pass over the activation finds
    it), so each K tile is only multiplied and converted, and the fp16 products accumulate in the dot itself
    (``kernel_sass.py``: 3.26 instructions per weight element against 3.64 at 128 x 256 tiles); exact down to
    2^-28 of the row's largest element in that range instead of in each tile."""
    pid, pid_k, rm, rn, m_ok, n_ok, k_lo, k_hi = _mm_tile(M, N, K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ONE_SCALE:  # one power of two per row for the program's whole K range, from a first pass over it
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(A + rm[:, None] * stride_am + rk[None, :], mask=m_ok[:, None] & (rk < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(a.to(tl.float32)), axis=1))
        up, down = _pow2_rows(amax, 268)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(A + rm[:, None] * stride_am + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # the weight load sits in both branches: after _f16_rows in the default one, whose sm_90 code (184
        # registers) a load ahead of it changed (229 registers, more instructions per element)
        if ONE_SCALE:
            wt = tl.load(B + rn[None, :] * stride_bn + rk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0)
            acc = tl.dot((a.to(tl.float32) * up[:, None]).to(tl.float16), _i8_f16(wt, ASM), acc)
        else:
            a16, down = _f16_rows(a, 268)  # 268 = 127 + 14 + 127
            wt = tl.load(B + rn[None, :] * stride_bn + rk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0)
            acc += tl.dot(a16, _i8_f16(wt, ASM)) * down[:, None]
    if ONE_SCALE:
        acc = acc * down[:, None]
    out = _scale_columns(acc, SW, rn, n_ok, W_SCALE)
    _mm_store(out, BIAS, C, OUT, COUNT, pid, pid_k, rm, rn, m_ok, n_ok, M, N, stride_cm, SPLIT_K, HAS_BIAS,
              PARTIAL, LAST_SUMS, GLU)


@triton.jit
def _u4_16(w, FP16: tl.constexpr, ASM: tl.constexpr):
    """(low, high) nibbles ``u`` of the bytes ``w`` (uint8) as the exact 16-bit floats ``u - 8`` (bfloat16, or
    half with ``FP16``): the byte ``u`` under the exponent byte ``0x43`` is the bfloat16 ``128 + u`` (under
    ``0x64`` the half ``1024 + u``), less 136 (1032). ``ASM``: four bytes (one 32-bit register of the dot
    operand's layout) give eight values in twelve instructions (thirteen for bfloat16), one or two of them
    constants: an and for the low nibbles, a shift and an and for the high ones, four byte permutes, four paired
    subtractions (fused multiply-adds ``x * 1 - 136`` for bfloat16), as :func:`_i8_f16` does for int8 codes.
    Without ``ASM`` (Triton's CPU interpreter, which runs no PTX) the same values in fp32, element by element."""
    if ASM:
        if FP16:
            lo, hi = tl.inline_asm_elementwise(
                "{ .reg .b32 l, h, c; and.b32 l, $4, 0x0f0f0f0f; shr.b32 h, $4, 4; and.b32 h, h, 0x0f0f0f0f;"
                " mov.b32 c, 0x64086408;"
                " prmt.b32 $0, l, 0x64646464, 0x4140; prmt.b32 $1, l, 0x64646464, 0x4342;"
                " prmt.b32 $2, h, 0x64646464, 0x4140; prmt.b32 $3, h, 0x64646464, 0x4342;"
                " sub.f16x2 $0, $0, c; sub.f16x2 $1, $1, c; sub.f16x2 $2, $2, c; sub.f16x2 $3, $3, c; }",
                "=r,=r,=r,=r,r", [w], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(
                "{ .reg .b32 l, h, one, c; and.b32 l, $4, 0x0f0f0f0f; shr.b32 h, $4, 4; and.b32 h, h, 0x0f0f0f0f;"
                " mov.b32 one, 0x3f803f80; mov.b32 c, 0xc308c308;"
                " prmt.b32 $0, l, 0x43434343, 0x4140; prmt.b32 $1, l, 0x43434343, 0x4342;"
                " prmt.b32 $2, h, 0x43434343, 0x4140; prmt.b32 $3, h, 0x43434343, 0x4342;"
                " fma.rn.bf16x2 $0, $0, one, c; fma.rn.bf16x2 $1, $1, one, c;"
                " fma.rn.bf16x2 $2, $2, one, c; fma.rn.bf16x2 $3, $3, one, c; }",
                "=r,=r,=r,=r,r", [w], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        u = w.to(tl.int32) & 0xFF
        # the interpreter's 16-bit dots are wrong: fp32 operands there
        lo, hi = ((u & 0xF) - 8).to(tl.float32), ((u >> 4) - 8).to(tl.float32)
    return lo, hi


@triton.jit
def w4_f16mma_kernel(A, B, SW, ZW, BIAS, C, OUT, COUNT, M, N, K, stride_am, stride_bn, stride_cm, stride_sw,
                     GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K,
                     PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP16: tl.constexpr = False,
                     LAST_SUMS: tl.constexpr = False, ASM: tl.constexpr = True):
    """W4A16 at decode-sized M on the 16-bit tensor cores, :func:`w8_mma_kernel`'s structure (the weight as the
    right operand, the activation rows padded to ``BLOCK_M``): ``C = A @ dequant(B).T (+ BIAS)`` with A bf16
    (``FP16``: half) (M, K) and B nibble-packed int4 codes (N, K/2; even columns in the low nibbles) under
    (N, K/GROUP) scales (and zero points). Each quantization group is ``GROUP / 2`` bytes per weight row, whose
    low and high nibbles become ``u - 8`` in the activation's dtype from their bits
    (:func:`_u4_16`; small integers, exact) and meet the even and the odd activation columns in two dots, so the
    nibbles are never interleaved and the activation is used as it is. Products are exact, sums fp32; the
    group's partial product is scaled per column by the group scale into the accumulator. A zero point ``z``
    enters as ``-(z - 8) * sum(a over the group)``. Split-K over the groups as :func:`wq_mm_kernel`."""
    HALF: tl.constexpr = GROUP // 2
    pid, pid_k, rm, rn, m_ok, n_ok, k_lo, k_hi = _mm_tile(M, N, K, SPLIT_K, BLOCK_M, BLOCK_N, GROUP)
    rh = tl.arange(0, HALF)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_row = A + rm[:, None] * stride_am + tl.arange(0, GROUP)[None, :]
    w_ptrs = B + rn[None, :] * stride_bn + rh[:, None]
    s_ptrs = SW + rn * stride_sw
    for k0 in range(k_lo, k_hi, GROUP):
        g = k0 // GROUP
        x = tl.load(a_row + k0, mask=m_ok[:, None], other=0.0)
        xe, xo = tl.split(tl.reshape(x, (BLOCK_M, HALF, 2)))
        if not ASM:
            xe, xo = xe.to(tl.float32), xo.to(tl.float32)
        wt = tl.load(w_ptrs + k0 // 2, mask=n_ok[None, :], other=0)
        w_lo, w_hi = _u4_16(wt, FP16, ASM)
        part = tl.dot(xo, w_hi, tl.dot(xe, w_lo))
        if HAS_ZERO:
            z = tl.load(ZW + rn * stride_sw + g, mask=n_ok, other=8).to(tl.float32) - 8.0
            xsum = tl.sum(xe.to(tl.float32), axis=1) + tl.sum(xo.to(tl.float32), axis=1)
            part -= xsum[:, None] * z[None, :]
        acc += part * tl.load(s_ptrs + g, mask=n_ok, other=0.0)[None, :]
    _mm_store(acc, BIAS, C, OUT, COUNT, pid, pid_k, rm, rn, m_ok, n_ok, M, N, stride_cm, SPLIT_K, HAS_BIAS,
              PARTIAL, LAST_SUMS)


@triton.jit
def _u4_i8(w, ASM: tl.constexpr):
    """(low, high) nibbles ``u`` (0..15) of the bytes ``w`` (uint8) as int8 codes. ``ASM``: four bytes (one 32-bit
    register) give eight codes in three instructions (an and, a shift, an and). Without ``ASM`` (Triton's CPU
    interpreter) the same values element by element."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; and.b32 $0, $2, 0x0f0f0f0f; shr.b32 t, $2, 4; and.b32 $1, t, 0x0f0f0f0f; }",
            "=r,=r,r", [w], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    else:
        u = w.to(tl.int32) & 0xFF
        lo, hi = (u & 0xF).to(tl.int8), (u >> 4).to(tl.int8)
    return lo, hi


@triton.jit
def _int8_pieces(x):
    """Float rows ``x`` (G, R, GROUP), fp32, as four int8 pieces per element: ``x = s * (q0 + q1 / 2^6 + q2 / 2^12
    + q3 / 2^18)`` with ``s`` a power of two per row (``2^(E - 6)`` for a row whose largest magnitude lies in
    ``[2^E, 2^(E+1))``). Each piece is the rounded rest of the ones before it (every step exact in fp32), so
    |q0| <= 127, |q1| <= 64, |q2|, |q3| <= 32, and a bf16 element is held exactly when it is at least ``2^-17`` of
    its row's largest (smaller ones to ``2^-25`` of it). Returns the pieces stacked as (G, 4 R, GROUP) fp32
    integers (row ``4 r + piece``) and the fp32 scale of each of those rows, (G, 4 R)."""
    amax = tl.max(tl.abs(x), axis=2)
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent of the largest; 0 for a zero row
    sb = tl.minimum(tl.maximum(e - 6, 1), 254 - 6)
    s = (sb << 23).to(tl.float32, bitcast=True)
    inv = ((254 - sb) << 23).to(tl.float32, bitcast=True)[:, :, None]
    q0 = tl.minimum(tl.maximum(_rint_small(x * inv), -127.0), 127.0)
    r = x - q0 * s[:, :, None]
    q1 = _rint_small((r * inv) * 64.0)
    r = r - q1 * (s * (1.0 / 64))[:, :, None]
    q2 = _rint_small((r * inv) * 4096.0)
    r = r - q2 * (s * (1.0 / 4096))[:, :, None]
    q3 = _rint_small((r * inv) * 262144.0)
    G: tl.constexpr = x.shape[0]
    R: tl.constexpr = x.shape[1]
    GROUP: tl.constexpr = x.shape[2]
    q = tl.join(tl.join(q0, q1), tl.join(q2, q3))  # (G, R, GROUP, 2, 2): [..., i, j] is piece 2 j + i
    q = tl.reshape(tl.permute(q, (0, 1, 4, 3, 2)), (G, 4 * R, GROUP))
    p = tl.arange(0, 4)
    f = tl.where(p == 0, 1.0, tl.where(p == 1, 1.0 / 64, tl.where(p == 2, 1.0 / 4096, 1.0 / 262144)))
    rs = tl.reshape(s[:, :, None] * f[None, None, :], (G, 4 * R))
    return q, rs


@triton.jit
def int8_pieces_kernel(A, P, RS, XS, M, stride_am, K_UP, GROUP: tl.constexpr, GPS: tl.constexpr,
                       GATED: tl.constexpr = False):
    """The left MMA operand of :func:`w4_i8mma_kernel` for one step of ``GPS`` groups (program ``s``): the activation
    rows' four int8 pieces (:func:`_int8_pieces`) block-diagonal over the groups, stored as (16, 2, STEP / 2)
    int8 (even columns, then odd ones) at ``P[s]``, with each MMA row's power-of-two scale ``RS[s]`` (16) and
    the sum of its pieces ``XS[s]`` (16; fp32, exact). ``GATED``: each row of ``A`` is a gated MLP's gate|up pair
    (the up half from column ``K_UP``) and the activation is ``silu(gate) * up``, computed in fp32 and rounded to
    ``A``'s dtype once (as Inductor's fused SiLU·mul kernel does)."""
    RG: tl.constexpr = 16 // GPS
    AR: tl.constexpr = RG // 4
    STEP: tl.constexpr = GPS * GROUP
    s = tl.program_id(0)
    rm = tl.arange(0, AR)
    gj = tl.arange(0, GPS)
    kk = tl.arange(0, GROUP)
    offs = rm[None, :, None] * stride_am + (s * STEP + gj[:, None, None] * GROUP + kk[None, None, :])
    x = tl.load(A + offs, mask=(rm < M)[None, :, None], other=0.0)
    if GATED:
        g = x.to(tl.float32)
        u = tl.load(A + K_UP + offs, mask=(rm < M)[None, :, None], other=0.0).to(tl.float32)
        x = g * tl.sigmoid(g) * u
        x = _rounded(x, A.dtype.element_ty)
    x = x.to(tl.float32)
    q, rs = _int8_pieces(x)
    store_pieces(q, rs, P, RS, XS, s)


@triton.jit
def add_rms_norm_pieces_kernel(X, R, W, S, P, RS, XS, K, eps, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """A decoder layer's residual add and RMSNorm for one row, ending in :func:`w4_i8mma_kernel`'s left operand
    instead of the normalized row: ``S = X + R`` (rounded to ``X``'s dtype, as the layer's add), then Hugging Face's
    RMSNorm ``W * (S · rsqrt(mean(S²) + eps))`` (fp32, the normalized row rounded to the dtype before the product
    with ``W``, the product rounded once) and its int8 pieces for one step of four groups (program ``s``; the
    layout of :func:`int8_pieces_kernel` with ``GPS = 4``). Every program reads the whole row for the mean and
    stores its own step's share of ``S``."""
    GPS: tl.constexpr = 4
    STEP: tl.constexpr = GPS * GROUP
    DT: tl.constexpr = X.dtype.element_ty
    s = tl.program_id(0)
    kk = s * STEP + tl.arange(0, STEP)
    # the step's own loads first: every load is issued before the row's reduction waits on any of them
    xs = tl.load(X + kk)
    rs_ = tl.load(R + kk)
    w = tl.load(W + kk)
    offs = tl.arange(0, BLOCK_K)
    ok = offs < K
    v = _rounded(tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
                 + tl.load(R + offs, mask=ok, other=0.0).to(tl.float32), DT)
    rstd = tl.math.rsqrt(tl.sum(v * v, axis=0) / K + eps)
    vs = _rounded(xs.to(tl.float32) + rs_.to(tl.float32), DT)
    tl.store(S + kk, vs.to(DT))
    y = _rounded(w.to(tl.float32) * _rounded(vs * rstd, DT), DT)
    q, rs = _int8_pieces(tl.reshape(y, (GPS, 1, GROUP)))
    store_pieces(q, rs, P, RS, XS, s)


@triton.jit
def store_pieces(q, rs, P, RS, XS, s):
    """Step ``s``'s pieces ``q`` (GPS, 16 / GPS, GROUP) and row scales ``rs`` (GPS, 16 / GPS) from
    :func:`_int8_pieces` in :func:`w4_i8mma_kernel`'s layout: ``P[s]`` (16, 2, STEP / 2) int8, block-diagonal
    over the groups (even columns, then odd ones), ``RS[s]`` and the sums of the pieces ``XS[s]`` (16, fp32)."""
    GPS: tl.constexpr = q.shape[0]
    GROUP: tl.constexpr = q.shape[2]
    HALF: tl.constexpr = GROUP // 2
    STEP: tl.constexpr = GPS * GROUP
    rows = tl.arange(0, 16)
    tl.store(RS + s * 16 + rows, tl.reshape(rs, (16,)))
    tl.store(XS + s * 16 + rows, tl.reshape(tl.sum(q, axis=2), (16,)))
    if GPS > 1:
        gj = tl.arange(0, GPS)
        eye = tl.reshape((gj[:, None] == gj[None, :]).to(tl.float32), (GPS, 1, GPS, 1))
        q = tl.reshape(q[:, :, None, :] * eye, (16, STEP))
    else:
        q = tl.reshape(q, (16, STEP))
    qe, qo = tl.split(tl.reshape(q.to(tl.int8), (16, GPS * HALF, 2)))
    cols = tl.arange(0, GPS * HALF)
    base = P + s * (16 * STEP) + rows[:, None] * STEP + cols[None, :]
    tl.store(base, qe)
    tl.store(base + GPS * HALF, qo)


@triton.jit
def w4_i8mma_kernel(P, RS, XS, B, SW, ZW, BIAS, C, OUT, COUNT, M, N, K, stride_bn, stride_cm, stride_sw,
                    GROUP: tl.constexpr, GPS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K,
                    PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr, LAST_SUMS: tl.constexpr = False,
                    ASM: tl.constexpr = True, GLU: tl.constexpr = False):
    """W4A16 at one to four rows on the int8 tensor cores with the activation's pieces made beforehand
    (:func:`int8_pieces_kernel`): per step of ``GPS`` groups, the (16, STEP) int8 tile of pieces times the
    nibbles ``u`` (int8, as they are), int32 sums exact per group, made fp32 exactly (``2^23 + 2^22`` added to the
    bits and taken off again with the zero point ``z`` (8, or the stored one) times the row's sum of pieces
    ``XS``) and scaled per MMA row (``RS``) and by the group scale into an fp32 accumulator; each activation row's
    pieces and groups are added up after the loop. Split-K over the steps as :func:`wq_mm_kernel`."""
    HALF: tl.constexpr = GROUP // 2
    RG: tl.constexpr = 16 // GPS
    AR: tl.constexpr = RG // 4
    STEP: tl.constexpr = GPS * GROUP
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rm = tl.arange(0, AR)
    m_ok = rm < M
    k_lo, k_hi = _split_range(pid_k, K, SPLIT_K, STEP)
    rows = tl.arange(0, 16)
    cols = tl.arange(0, GPS * HALF)
    p_ptrs = P + rows[:, None] * STEP + cols[None, :]
    w_ptrs = B + rn[None, :] * stride_bn + cols[:, None]
    s_offs = rn[None, :] * stride_sw + (rows // RG)[:, None]
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, STEP):
        st = k0 // STEP
        qe = tl.load(p_ptrs + st * (16 * STEP))
        qo = tl.load(p_ptrs + st * (16 * STEP) + GPS * HALF)
        wt = tl.load(w_ptrs + k0 // 2, mask=n_ok[None, :], other=0)
        w_lo, w_hi = _u4_i8(wt, ASM)
        part = tl.dot(qo, w_hi, tl.dot(qe, w_lo, out_dtype=tl.int32), out_dtype=tl.int32)
        rs = tl.load(RS + st * 16 + rows)
        xs = tl.load(XS + st * 16 + rows)
        ws = tl.load(SW + s_offs + k0 // GROUP, mask=n_ok[None, :], other=0.0)
        if HAS_ZERO:
            z = tl.load(ZW + s_offs + k0 // GROUP, mask=n_ok[None, :], other=8).to(tl.float32)
            v = (part + 0x4B400000).to(tl.float32, bitcast=True) - (12582912.0 + xs[:, None] * z)
        else:
            v = (part + 0x4B400000).to(tl.float32, bitcast=True) - (12582912.0 + 8.0 * xs)[:, None]
        acc += (v * rs[:, None]) * ws
    out = tl.sum(tl.sum(tl.reshape(acc, (GPS, AR, 4, BLOCK_N)), axis=2), axis=0)
    _mm_store(out, BIAS, C, OUT, COUNT, pid, pid_k, rm, rn, m_ok, n_ok, M, N, stride_cm, SPLIT_K, HAS_BIAS,
              PARTIAL, LAST_SUMS, GLU)


@triton.jit
def scale_epilogue_kernel(ACC, SA, SW, BIAS, C, M, N, stride_am, stride_cm,
                          SA_ROW: tl.constexpr, SW_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    mask = m_ok[:, None] & n_ok[None, :]
    rm64 = rm.to(tl.int64)
    acc = tl.load(ACC + rm64[:, None] * stride_am + rn[None, :], mask=mask, other=0)
    out = scale_rows_cols(acc, rm, rn, m_ok, n_ok, SA, SW, BIAS, SA_ROW, SW_COL, HAS_BIAS)
    tl.store(C + rm64[:, None] * stride_cm + rn[None, :], out.to(C.dtype.element_ty), mask=mask)


@triton.jit
def scale_rows_cols(acc, rm, rn, m_ok, n_ok, SA, SW, BIAS, SA_ROW: tl.constexpr, SW_COL: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
    """The W8A8 scale epilogue on an integer tile: ``fp32(acc) * SA[rm] * SW[rn] (+ BIAS[rn])`` in that order
    (``SA`` / ``SW``: one value unless ``SA_ROW`` / ``SW_COL``). Shared by ``scale_epilogue_kernel`` and
    ``int8_gemm``, whose results are then bit for bit equal."""
    out = acc.to(tl.float32)
    if SA_ROW:
        out = out * tl.load(SA + rm, mask=m_ok, other=0.0)[:, None]
    else:
        out = out * tl.load(SA)
    if SW_COL:
        out = out * tl.load(SW + rn, mask=n_ok, other=0.0)[None, :]
    else:
        out = out * tl.load(SW)
    if HAS_BIAS:
        out = out + tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return out

@triton.jit
def dequant_kernel(B, SW, ZW, W, N, K, GROUP, stride_bn, stride_sw,
                   W_KIND: tl.constexpr, W_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    n_ok = rn < N
    k_ok = rk < K
    rn64 = rn.to(tl.int64)
    if W_KIND == 2:
        rh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        p = tl.load(B + rn64[:, None] * stride_bn + rh[None, :], mask=n_ok[:, None] & (rh[None, :] < K // 2),
                    other=0)
        u = tl.interleave(p & 0xF, p >> 4).to(tl.float32)
        g = rk // GROUP
        sp = rn64[:, None] * stride_sw + g[None, :]
        s = tl.load(SW + sp, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_ZERO:
            z = tl.load(ZW + sp, mask=n_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)
        else:
            z = 8.0
        w = (u - z) * s
    else:
        w = tl.load(B + rn64[:, None] * stride_bn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0).to(tl.float32)
        if W_SCALE == 1:
            w = w * tl.load(SW + rn, mask=n_ok, other=0.0)[:, None]
        else:
            w = w * tl.load(SW)
    tl.store(W + rn64[:, None] * K + rk[None, :], w.to(W.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])



# --------------------------------------------------------------------------- launch wrappers
FP8_MAX = 448.0
A_FLOAT, A_INT8, A_FP8 = 0, 1, 2
W_INT8, W_FP8, W_INT4 = 0, 1, 2


def _a_kind(a: torch.Tensor) -> int:
    """``A_FLOAT`` / ``A_INT8`` / ``A_FP8``: what the activation operand of a kernel holds."""
    return A_FP8 if a.dtype == torch.float8_e4m3fn else (A_FLOAT if a.is_floating_point() else A_INT8)


@functools.lru_cache(maxsize=None)
def _fp32_reciprocal(v: float) -> float:
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(v, dtype=torch.float32))


#: the size rule of :func:`quantize_rows`'s ``split``: dynamic scales for at most ``SPLIT_ROWS_MAX_M`` rows of at
#: least ``SPLIT_ROWS_MIN_K`` elements (decode: the 14336-wide down_proj input of Llama-3-8B) in two launches over
#: ``SPLIT_ROWS_BLOCK``-element tiles (the tiles' maxima, then the codes), where one program per row streams its
#: whole row alone (``activation.SPLIT_DYNAMIC_ROWS`` asks for it)
SPLIT_ROWS_MAX_M = 16
SPLIT_ROWS_MIN_K = 8192
SPLIT_ROWS_BLOCK = 1024


#: the quantizing kernels compute their codes with :func:`codes`' ``FAST`` sequence (the same codes, bit for bit;
#: about half the instructions per element, ``benchmarks/kernel_sass.py --only quant``). H200: ``quantize_rows``
#: gave the exact sequence's codes and scales bit for bit (int8 and fp8, static, dynamic and split, fp32 and bf16
#: inputs, inf, NaN, 1e30 and both zeros; ``tests/test_fast_codes.py``); the R4 Hadamard + int8 quantization at
#: 16384 x 14336 took 0.64-0.66 ms fused against 1.09-1.15 ms with the exact sequence
#: (``results/hadamard_gpu_fast_codes_16384.txt``); with ``activation.FUSED_MIN_ROWS`` fp8 static + QuaRot's cost
#: over fp8 static went from 9.1% to 6.4% (``results/generate_gpu_ab_fast_codes.json``)
FAST_CODES = True


def fast_codes() -> bool:
    """Whether launches pass ``FAST`` to :func:`codes` (:data:`FAST_CODES`; never in Triton's CPU interpreter,
    which has no fp8 conversion instruction to round)."""
    return FAST_CODES and not _INTERPRET


def split_rows(M: int, K: int) -> bool:
    """Whether :func:`quantize_rows` computes dynamic scales of ``M`` rows of ``K`` over tiles (two launches)."""
    return M <= SPLIT_ROWS_MAX_M and K >= SPLIT_ROWS_MIN_K


def quantize_rows(x: torch.Tensor, fp8: bool, static_scale: torch.Tensor | None = None, split: bool = False):
    """Quantize the rows of ``x`` (..., K). Returns ``(codes, scale)``: codes like ``x`` in int8 or
    float8_e4m3fn; ``scale`` fp32 of shape ``x.shape[:-1] + (1,)`` (dynamic per-token), or ``None``
    when ``static_scale`` (a one-element fp32 tensor) was given. With ``split``, a dynamic scale for a few long
    rows (:func:`split_rows`) is computed over tiles in two launches; the same codes and scales."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    q = torch.empty((M, K), device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    static = static_scale is not None
    s = None if static else torch.empty((M,), device=x.device, dtype=torch.float32)
    block = min(4096, max(128, 1 << (K - 1).bit_length()))
    qmax = FP8_MAX if fp8 else 127.0
    if M and split and not static and split_rows(M, K):
        t = triton.cdiv(K, SPLIT_ROWS_BLOCK)
        amax = torch.empty((M, t), device=x.device, dtype=torch.float32)
        tile_amax_kernel[(M, t)](x2, amax, K, x2.stride(0), t, BLOCK=SPLIT_ROWS_BLOCK, num_warps=4)
        tile_quant_kernel[(M, t)](x2, q, s, amax, K, x2.stride(0), K, t, T_PAD=max(2, 1 << (t - 1).bit_length()),
                                  QMAX=qmax, RCP=_fp32_reciprocal(qmax), FP8=fp8, BLOCK=SPLIT_ROWS_BLOCK,
                                  FAST=fast_codes(), num_warps=4)
    elif M:
        quant_rows_kernel[(M,)](x2, q, s if s is not None else q, static_scale if static else q, K, x2.stride(0), K,
                              QMAX=qmax, RCP=_fp32_reciprocal(qmax), FP8=fp8, STATIC=static, BLOCK=block,
                              FAST=fast_codes(), num_warps=4 if block <= 1024 else 8)
    q = q.reshape(x.shape)
    return q, (None if static else s.reshape(*x.shape[:-1], 1))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


#: ``wq_mm`` tiles by M bucket (16 / 32 / 64 rows) and, optionally, weight kind; ``SPLIT_TARGET``
#: programs per SM are aimed for with split-K. ``benchmarks/e2e_gpu.py --sweep`` measures options.
TILES = {16: dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
         32: dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
         64: dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)}
TILES_BY_KIND: dict[tuple[int, int], dict] = {}
SPLIT_TARGET = 2


def _mm_config(M: int, N: int, K: int, w_kind: int, group: int, device) -> dict:
    """Tile sizes and split-K for ``wq_mm`` (decode-sized M)."""
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    cfg = dict(TILES_BY_KIND.get((w_kind, bm), TILES[bm]))
    bk = cfg["BLOCK_K"]
    if w_kind == W_INT4:
        while bk > 16 and group % bk:
            bk //= 2
    tiles = -(-M // bm) * -(-N // cfg["BLOCK_N"])
    target = SPLIT_TARGET * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    split = 1
    while tiles * split * 2 <= target and K >= bk * split * 4:
        split *= 2
    return dict(cfg, BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=split)


def _output(M: int, N: int, split: int, device, out_dtype) -> torch.Tensor:
    """The buffer a launch writes: the (M, N) result in ``out_dtype``, or with split-K an uninitialised
    (split, M, N) fp32 workspace, one slice per split (every element is written), for :func:`split_sum`."""
    if split > 1:
        return torch.empty((split, M, N), device=device, dtype=torch.float32)
    return torch.empty((M, N), device=device, dtype=out_dtype)


#: split-K results added up by each tile's last split inside the matmul launch (``wq_mm``, ``gemv_packed``)
#: instead of a second, ``split_sum`` launch (about 1.3 us per launch on the H200 in a decode step,
#: results/decode_profile_split_reductions.json). Same sums in the same order. A/B in one H200 run
#: (results/generate_gpu_ab_switches.json, ``LAST_SPLIT_SUMS=0`` twins), decode per layer: no measurable
#: difference (batch 1: fp8 dynamic 0.1021 both, int8 0.1024 on vs 0.1010 off; batch 16: 0.1148 vs 0.1161 and
#: 0.1146 vs 0.1124); kept for the launch it saves
LAST_SPLIT_SUMS = True
_COUNTERS: dict = {}


def tile_counters(device: torch.device, n: int) -> torch.Tensor:
    """``n`` (at least) zeroed int32 counters for the kernels whose last program of a group finishes the
    work (:func:`_last_split_sums`). Every launch leaves the
    counters it used at zero, so launches on one stream share them, CUDA-graph replays included; each
    stream has its own, so launches on concurrent streams never meet."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        key = (idx, torch.cuda.current_stream(idx).cuda_stream)
    else:  # Triton's CPU interpreter
        key = (str(device), 0)
    bufs = _COUNTERS.setdefault(key, [])
    if not bufs or bufs[-1].numel() < n:
        # a larger set is added, never swapped in: a captured CUDA graph keeps the address of the one it saw
        bufs.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
    return bufs[-1]


def glu_fits(N: int, block_n: int, split: int) -> bool:
    """Whether a launch with ``block_n``-column tiles and ``split`` K-splits can store ``silu(gate) * up`` of an
    interleaved gate|up product itself (``GLU``): whole block pairs per tile, and one split or the last split's sums."""
    return N % (2 * GLU_BLOCK) == 0 and block_n % (2 * GLU_BLOCK) == 0 and (split == 1 or LAST_SPLIT_SUMS)


def _split_outputs(M: int, N: int, split: int, tiles: int, device, out_dtype, glu: bool = False):
    """(workspace, result, counters, last_sums) for a launch of ``wq_mm`` / ``gemv_packed``: with split-K and
    ``LAST_SPLIT_SUMS`` the kernel writes the result itself, else ``split_sum`` runs on the workspace. ``glu``
    (:func:`glu_fits`): the result is (M, N / 2)."""
    if glu:
        if split == 1:
            c = torch.empty((M, N // 2), device=device, dtype=out_dtype)
            return c, c, c, False
        return (_output(M, N, split, device, out_dtype), torch.empty((M, N // 2), device=device, dtype=out_dtype),
                tile_counters(device, tiles), True)
    c = _output(M, N, split, device, out_dtype)
    if split == 1 or not LAST_SPLIT_SUMS:
        return c, c, c, False
    return c, torch.empty((M, N), device=device, dtype=out_dtype), tile_counters(device, tiles), True


SPLIT_SUM_BLOCK = 1024


def split_sum(c: torch.Tensor, out_dtype) -> torch.Tensor:
    """The (M, N) result from a launch's :func:`_output`: the splits' partial sums added up (one kernel), or ``c``
    itself when there was one split."""
    if c.dim() == 2:
        return c
    split, M, N = c.shape
    out = torch.empty((M, N), device=c.device, dtype=out_dtype)
    split_sum_kernel[(triton.cdiv(M * N, SPLIT_SUM_BLOCK),)](c, out, M * N, SPLIT=split, BLOCK=SPLIT_SUM_BLOCK,
                                                             num_warps=4)
    return out


def wq_mm(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, w_kind: int, a_scale=None,
          w_zero=None, bias=None, group: int = 0, out_dtype=None, config: dict | None = None,
          glu: bool = False) -> torch.Tensor | None:
    """``a (M, K) @ dequant(w).T -> (M, N)``. ``a``: float (weight-only) or int8 / fp8 codes with
    ``a_scale`` (one per row, or one). ``w``: int8 / fp8 (N, K), or int4 nibble-packed (N, K/2) with
    ``w_scale`` / ``w_zero`` of shape (N, K/group). ``glu``: ``silu(gate) * up`` (M, N / 2) of an interleaved
    gate|up weight (``GLU_BLOCK``), or None where the tiles do not allow it (:func:`glu_fits`)."""
    M, K = a.shape
    N = w.shape[0]
    a_kind = _a_kind(a)
    out_dtype = out_dtype or a.dtype
    cfg = dict(config or _mm_config(M, N, K, w_kind, group, a.device))
    split = cfg["SPLIT_K"]
    if glu and not glu_fits(N, cfg["BLOCK_N"], split):
        return None
    w_scale_kind = 2 if w_kind == W_INT4 else (1 if w_scale.numel() > 1 else 0)
    grid = (-(-M // cfg["BLOCK_M"]) * -(-N // cfg["BLOCK_N"]), split)
    c, out, count, last = _split_outputs(M, N, split, grid[0], a.device, out_dtype, glu)
    dummy = w_scale
    wq_mm_kernel[grid](a, w, w_scale, w_zero if w_zero is not None else dummy,
                     a_scale if a_scale is not None else dummy, bias if bias is not None else dummy, c, out, count,
                     M, N, K, max(group, 1), a.stride(0), w.stride(0), c.stride(-2),
                     w_scale.stride(0) if w_scale.dim() == 2 else 0,
                     A_KIND=a_kind, W_KIND=w_kind, W_SCALE=w_scale_kind, HAS_ZERO=w_zero is not None,
                     SA_ROW=a_scale is not None and a_scale.numel() > 1, HAS_BIAS=bias is not None,
                     PARTIAL=split > 1, LAST_SUMS=last, GLU=glu, **cfg)
    return out if last or glu else split_sum(c, out_dtype)


#: Decode kernels measured on the GPU (``benchmarks/decode_kernels.py`` writes ``gemv_tuned.json`` beside
#: this file): "<GPU name>" -> "<a_kind>,<w_kind>,<N>,<K>,<M bucket>" -> dict(impl="gemv"|"wq_mm", tile
#: options, us = the measured time). Shapes not in it use the heuristics of :func:`decode_choice`.
GEMV_PROGRAMS_PER_SM = 4


@functools.lru_cache(maxsize=None)
def _tuned(device_name: str) -> dict:
    import json
    from pathlib import Path

    path = Path(__file__).with_name("gemv_tuned.json")
    table = json.loads(path.read_text()).get(device_name, {}) if path.is_file() else {}
    return {tuple(int(v) for v in k.split(",")): cfg for k, cfg in table.items()}


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def decode_choice(M: int, N: int, K: int, a_kind: int, w_kind: int, group: int, device) -> tuple[str, dict] | None:
    """(kernel, tile options) for a decode-sized product, or None when none fits (M too large): the measured
    table first, else heuristics from the H200 sweeps (``benchmarks/results/decode_kernels.json``,
    ``decode_kernels_packed.json``, ``gemv_sweep_v1.json``): at M <= 4 torch's tinygemm for int4 weights
    ("tinygemm": ``QuantLinear`` runs it where it built that layout, else :func:`decode_mm` runs
    ``gemv_packed``), ``gemv_packed`` for large int8 weights, the CUDA-core ``gemv`` for small weights (it
    has the least fixed cost); else ``wq_mm`` (tensor cores; W8A8 codes go in as they are, weight-only
    codes are dequantized in registers). The table may also name ``w4_mma`` (W4A16 up to 16 rows; on the H200
    it is in the table for 16 rows of q/o, qkv and gate|up, ``decode_kernels_w4_mma.json``); the heuristics do
    not pick it, as it is measured on the H200 only; nor ``w8_mma`` (W8A16 on the fp16 tensor cores; in the H200
    table for 16 rows of every shape and one row of gate/up, ``decode_kernels_w8a16_w8mma.json``) or
    ``w4_f16mma`` (W4A16; in the H200 table for 16 rows of every shape and one row of gate/up,
    ``decode_kernels_w4_f16mma*.json``) or ``w4_i8mma`` (W4A16 at one to four rows on the int8 tensor cores; in
    the H200 table for one row of gate|up and down, ``decode_kernels_w4_i8mma_cold.json``: 23.2 and 16.6 us with
    the weights read from HBM, against 30.4 for ``w4_f16mma`` and 17.0 for tinygemm).
    W8A8 entries of the H200 table name ``wq_mm`` with ``SWAP`` tiles for every shape
    (``decode_kernels_w8a8_swap_cold.json``, a ``--cold`` sweep: their ``us`` are with the weight read from HBM), as
    are the W8A16 / W4A16 entries of q/o and W8A16 qkv at one row (``decode_kernels_small_cold.json``,
    ``decode_kernels_qkv_w8a16_cold.json``); the other small-shape entries' ``us`` are with a weight kept in L2."""
    if M > (64 if a_kind == A_FLOAT else 16):
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    key = (a_kind, w_kind, N, K, m_bucket(M))
    cfg = _tuned(_device_name(idx)).get(key)
    if cfg is not None:
        cfg = {k: v for k, v in cfg.items() if k != "us"}
        return cfg.pop("impl", "gemv"), cfg
    if M <= 4 and a_kind == A_FLOAT and w_kind == W_INT4:
        return "tinygemm", {}  # faster than ours on all five Llama-3-8B shapes (decode_kernels_packed.json)
    if M <= 4 and a_kind == A_FLOAT and w_kind == W_INT8 and N * K > 8 * 1024 * 1024:
        return "gemv_packed", {}  # 52-72% of HBM from 16M weights up, ahead of gemv and wq_mm there
    small = {A_FLOAT: 32 if w_kind != W_INT4 else 4, A_INT8: 8, A_FP8: 8}[a_kind] * 1024 * 1024
    if M <= 4 and N * K <= small:
        return "gemv", {}
    return "wq_mm", {}


#: the decode kernels that can store ``silu(gate) * up`` of an interleaved gate|up product (``glu``)
GLU_KERNELS = ("w8_mma", "w4_i8mma", "wq_mm")


def glu_decode_fits(M: int, N: int, K: int, a_kind: int, w_kind: int, group: int, device) -> bool:
    """Whether :func:`decode_mm` with ``glu=True`` runs for an (N, K) gate|up weight at ``M`` rows: the kernel the
    decode table picks stores the SiLU·mul itself with its tiles (:func:`glu_fits`)."""
    choice = decode_choice(M, N, K, a_kind, w_kind, group, device)
    if choice is None or choice[0] not in GLU_KERNELS:
        return False
    impl, cfg = choice
    if impl == "wq_mm":
        cfg = _complete_wq_cfg(cfg, M, N, K, w_kind, group, device) or _mm_config(M, N, K, w_kind, group, device)
    elif impl == "w8_mma":
        cfg = _w8_mma_tiles(cfg, M, N, K, device)
    elif impl == "w4_i8mma":
        cfg = {**W4_I8MMA_TILES, **cfg}
    return glu_fits(N, cfg["BLOCK_N"], cfg["SPLIT_K"])


def decode_mm(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, w_kind: int, a_scale=None, w_zero=None,
              bias=None, group: int = 0, out_dtype=None, glu: bool = False):
    """``a @ dequant(w).T`` with the decode kernel :func:`decode_choice` picks, or None if none applies.
    ``glu``: ``silu(gate) * up`` (M, N / 2) of an interleaved gate|up weight (``GLU_BLOCK``), stored by the kernel
    itself, or None where the picked kernel cannot (:data:`GLU_KERNELS`, :func:`glu_fits`)."""
    M, K = a.shape
    a_kind = _a_kind(a)
    choice = decode_choice(M, w.shape[0], K, a_kind, w_kind, group, a.device)
    if choice is None or (glu and choice[0] not in GLU_KERNELS):
        return None
    impl, cfg = choice
    if glu:
        if impl == "wq_mm":
            return wq_mm(a, w, w_scale, w_kind=w_kind, a_scale=a_scale, w_zero=w_zero, bias=bias, group=group,
                         out_dtype=out_dtype, config=_complete_wq_cfg(cfg, M, w.shape[0], K, w_kind, group, a.device),
                         glu=True)
        kernel = w8_mma if impl == "w8_mma" else w4_i8mma
        return kernel(a, w, w_scale, w_kind=w_kind, w_zero=w_zero, bias=bias, group=group, out_dtype=out_dtype,
                      config=cfg or None, a_scale=a_scale, glu=True)
    if impl == "tinygemm":  # torch's kernel runs where the caller holds its layout (QuantLinear); else ours
        impl, cfg = "gemv_packed", {}
    if impl == "w8_mma":
        out = w8_mma(a, w, w_scale, w_kind=w_kind, bias=bias, out_dtype=out_dtype, config=cfg or None)
        if out is not None:
            return out
        impl, cfg = "gemv_packed", {}
    nibble_mma = {"w4_f16mma": w4_f16mma, "w4_i8mma": w4_i8mma, "w4_mma": w4_mma}.get(impl)
    if nibble_mma is not None:  # the W4A16 tensor-core kernels: None where they refuse the operands
        out = nibble_mma(a, w, w_scale, w_kind=w_kind, w_zero=w_zero, bias=bias, group=group, out_dtype=out_dtype,
                         config=cfg or None, a_scale=a_scale)
        if out is not None:
            return out
        impl, cfg = "gemv_packed", {}
    if impl == "gemv_packed":
        out = gemv_packed(a, w, w_scale, w_kind=w_kind, w_zero=w_zero, bias=bias, group=group, out_dtype=out_dtype,
                          config=cfg or None, a_scale=a_scale)
        if out is not None:
            return out
        impl, cfg = "gemv", {}
    if impl == "wq_mm" or M > 4:
        return wq_mm(a, w, w_scale, w_kind=w_kind, a_scale=a_scale, w_zero=w_zero, bias=bias, group=group,
                     out_dtype=out_dtype, config=_complete_wq_cfg(cfg, M, w.shape[0], K, w_kind, group, a.device))
    return gemv(a, w, w_scale, w_kind=w_kind, a_scale=a_scale, w_zero=w_zero, bias=bias, group=group,
                out_dtype=out_dtype, config=cfg or None)


def _complete_wq_cfg(cfg, M, N, K, w_kind, group, device):
    if not cfg:
        return None
    base = _mm_config(M, N, K, w_kind, group, device)
    return {**base, **cfg, "BLOCK_M": base["BLOCK_M"]}


def _gemv_config(M: int, N: int, K: int, w_kind: int, group: int, device, cfg: dict | None = None) -> dict:
    """Tile options for :func:`gemv`: ``cfg`` completed, or the heuristic from the H200 sweep (8 weight rows
    per program, 1024-long K tiles at M = 1, fewer programs' rows when N is small)."""
    bm = 1 if M == 1 else (2 if M == 2 else 4)
    if not cfg:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        target = GEMV_PROGRAMS_PER_SM * _sm_count(idx)
        bn = 8 if N >= 8 * target // 2 else 4
        bk = 2048 if w_kind == W_INT4 else 1024
        while bk > 128 and (bk > K or bm * bn * bk > 8192):
            bk //= 2
        split = 1
        while -(-N // bn) * split * 2 <= target and K >= bk * split * 4:
            split *= 2
        cfg = dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=2)
    cfg = dict(cfg)
    cfg.setdefault("SPLIT_K", 1)
    cfg["GPT"] = 1
    if w_kind == W_INT4:  # a K tile holds whole groups (GPT of them) or lies inside one group
        bk = cfg["BLOCK_K"]
        if bk >= group and bk % group == 0:
            cfg["GPT"] = bk // group
        else:
            bk = min(bk, group)
            while bk > 16 and group % bk:
                bk //= 2
            cfg["BLOCK_K"] = bk
    cfg["BLOCK_M"] = bm
    return cfg


def gemv(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, w_kind: int, a_scale=None, w_zero=None,
         bias=None, group: int = 0, out_dtype=None, config: dict | None = None) -> torch.Tensor:
    """Like :func:`wq_mm`, for at most 4 rows (decode): every weight byte is read once for all rows."""
    M, K = a.shape
    if M > 4:
        raise ValueError(f"gemv takes at most 4 rows, got {M}")
    N = w.shape[0]
    a_kind = _a_kind(a)
    out_dtype = out_dtype or a.dtype
    cfg = _gemv_config(M, N, K, w_kind, group, a.device, config)
    split = cfg["SPLIT_K"]
    c = _output(M, N, split, a.device, out_dtype)
    dummy = w_scale
    gemv_kernel[(-(-N // cfg["BLOCK_N"]), split)](
        a, w, w_scale, w_zero if w_zero is not None else dummy, a_scale if a_scale is not None else dummy,
        bias if bias is not None else dummy, c, M, N, K, max(group, 1), a.stride(0), w.stride(0), c.stride(-2),
        w_scale.stride(0) if w_scale.dim() == 2 else 0, A_KIND=a_kind, W_KIND=w_kind,
        W_SCALE=2 if w_kind == W_INT4 else (1 if w_scale.numel() > 1 else 0), HAS_ZERO=w_zero is not None,
        SA_ROW=a_scale is not None and a_scale.numel() > 1, HAS_BIAS=bias is not None, **cfg)
    return split_sum(c, out_dtype)


def packed_words(w: torch.Tensor, w_kind: int, K: int, group: int = 0) -> torch.Tensor | None:
    """``w`` (int8 (N, K) or int4 nibble-packed (N, K/2)) viewed as int32 words (N, K/4 or K/8) for
    :func:`gemv_packed`, without a copy; None when the layout does not allow it."""
    if w_kind not in (W_INT8, W_INT4) or w.dim() != 2 or w.stride(1) != 1 or w.stride(0) % 4 \
            or w.storage_offset() % 4 or K % (8 if w_kind == W_INT4 else 4) \
            or (w_kind == W_INT4 and (group <= 0 or group % 8)):
        return None
    return w.view(torch.int32)


def _packed_config(M: int, N: int, Q: int, device, cfg: dict | None) -> dict:
    """Tile options for :func:`gemv_packed`: ``cfg`` completed, or 32 rows x 64 words per program with
    split-K until about 4 programs per SM."""
    bm = 1 if M == 1 else (2 if M == 2 else 4)
    if not cfg:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        target = GEMV_PROGRAMS_PER_SM * _sm_count(idx)
        bn, bq = 32, 64
        split = 1
        while -(-N // bn) * split * 2 <= target and Q >= bq * split * 2:
            split *= 2
        cfg = dict(BLOCK_N=bn, BLOCK_Q=bq, SPLIT_K=split, num_warps=4)
    cfg = dict(cfg)
    cfg.setdefault("SPLIT_K", 1)
    cfg.setdefault("PREFETCH", False)
    cfg["BLOCK_M"] = bm
    return cfg


def gemv_packed(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, w_kind: int, w_zero=None, bias=None,
                group: int = 0, out_dtype=None, config: dict | None = None, a_scale=None) -> torch.Tensor | None:
    """Weight-only ``a (M <= 4, K) float @ dequant(w).T`` through :func:`gemv_packed_kernel`; None when
    the operands do not fit it (activation codes, fp8 weights, a layout :func:`packed_words` refuses)."""
    M, K = a.shape
    if M > 4 or a_scale is not None or not a.is_floating_point() or a.stride(1) != 1:
        return None
    words = packed_words(w, w_kind, K, group)
    if words is None:
        return None
    N, Q = words.shape
    out_dtype = out_dtype or a.dtype
    cfg = _packed_config(M, N, Q, a.device, config)
    split = cfg["SPLIT_K"]
    tiles = -(-N // cfg["BLOCK_N"])
    c, out, count, last = _split_outputs(M, N, split, tiles, a.device, out_dtype)
    gemv_packed_kernel[(tiles, split)](
        a, words, w_scale, w_zero if w_zero is not None else w_scale, bias if bias is not None else w_scale, c,
        out, count, M, N, Q, a.stride(0), words.stride(0), c.stride(-2),
        w_scale.stride(0) if w_scale.dim() == 2 else 0, GROUP=max(group, 8), W_KIND=w_kind,
        W_SCALE=2 if w_kind == W_INT4 else (1 if w_scale.numel() > 1 else 0), HAS_ZERO=w_zero is not None,
        HAS_BIAS=bias is not None, LAST_SUMS=last, **cfg)
    return out if last else split_sum(c, out_dtype)


def _w4_mma_config(N: int, G: int, device, cfg: dict | None) -> dict:
    """Tile options for :func:`w4_mma`: ``cfg`` completed, or 64 weight rows per program with split-K until
    about ``GEMV_PROGRAMS_PER_SM`` programs per SM."""
    if not cfg:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        target = GEMV_PROGRAMS_PER_SM * _sm_count(idx)
        bn, split = 64, 1
        while -(-N // bn) * split * 2 <= target and G >= split * 4:
            split *= 2
        cfg = dict(BLOCK_N=bn, SPLIT_K=split, num_warps=4, num_stages=2)
    cfg = dict(cfg)
    cfg.setdefault("SPLIT_K", 1)
    cfg.setdefault("PREFETCH", False)
    cfg["BLOCK_M"] = 16
    return cfg


def _nibble_layout_fits(K: int, w: torch.Tensor, w_scale: torch.Tensor, w_zero, group: int) -> bool:
    """Whether the W4A16 tensor-core kernels take this weight: nibble-packed (N, K/2) codes with (N, K/group) scales
    (and zero points of the scales' strides), a group a multiple of 32 that divides K."""
    return not (group < 32 or group % 32 or K % group or w.dim() != 2 or w.stride(1) != 1 or 2 * w.shape[1] != K
                or w.dtype not in (torch.uint8, torch.int8) or w_scale.dim() != 2 or w_scale.shape[1] != K // group
                or (w_zero is not None and w_zero.stride() != w_scale.stride()))


def w4_mma(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, w_kind: int = W_INT4, w_zero=None,
           bias=None, group: int = 0, out_dtype=None, config: dict | None = None, a_scale=None) -> torch.Tensor | None:
    """W4A16 ``a (M <= 16, K) bf16/fp16 @ dequant(w).T`` through :func:`w4_mma_kernel`; None when the operands do
    not fit it (other weight kinds, activation codes, other activation dtypes, a group not a multiple of 32, a
    layout other than nibble-packed (N, K/2) with (N, K/group) scales)."""
    M, K = a.shape
    if w_kind != W_INT4 or a_scale is not None:
        return None
    if M > 16 or a.dtype not in (torch.bfloat16, torch.float16) or a.stride(1) != 1 \
            or not _nibble_layout_fits(K, w, w_scale, w_zero, group):
        return None
    N, G = w.shape[0], K // group
    out_dtype = out_dtype or a.dtype
    cfg = _w4_mma_config(N, G, a.device, config)
    split = cfg["SPLIT_K"]
    c = _output(M, N, split, a.device, out_dtype)
    w4_mma_kernel[(-(-N // cfg["BLOCK_N"]), split)](
        a, w, w_scale, w_zero if w_zero is not None else w_scale, bias if bias is not None else w_scale, c,
        M, N, G, a.stride(0), w.stride(0), c.stride(-2), w_scale.stride(0), GROUP=group,
        HAS_ZERO=w_zero is not None, HAS_BIAS=bias is not None, FP16=a.dtype == torch.float16, **cfg)
    return split_sum(c, out_dtype)


def _w8_mma_tiles(cfg: dict, M: int, N: int, K: int, device) -> dict:
    """:func:`w8_mma`'s tile options: ``cfg``, completed with the fp8 kernel's tiles (the same fp16 dot) unless it
    names the tile and split itself."""
    if not all(k in cfg for k in ("BLOCK_N", "BLOCK_K", "SPLIT_K")):
        cfg = {**_mm_config(M, N, K, W_FP8, 0, device), **cfg}
    return cfg


def w8_mma(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, w_kind: int = W_INT8, bias=None,
           out_dtype=None, config: dict | None = None, glu: bool = False, **_) -> torch.Tensor | None:
    """W8A16 ``a (M <= 64, K) float @ (w * w_scale).T (+ bias)`` through :func:`w8_mma_kernel`; None when it
    does not apply (not int8 weights, activation codes, more than 64 rows, a weight not contiguous along K;
    ``glu`` as :func:`wq_mm`'s where the tiles do not allow it)."""
    M, K = a.shape
    if w_kind != W_INT8 or _a_kind(a) != A_FLOAT or not 0 < M <= 64 or w.stride(1) != 1:
        return None
    N = w.shape[0]
    out_dtype = out_dtype or a.dtype
    cfg = _w8_mma_tiles(dict(config or {}), M, N, K, a.device)
    cfg["BLOCK_M"] = 16 if M <= 16 else 32 if M <= 32 else 64
    split = cfg["SPLIT_K"]
    if glu and not glu_fits(N, cfg["BLOCK_N"], split):
        return None
    grid = (-(-M // cfg["BLOCK_M"]) * -(-N // cfg["BLOCK_N"]), split)
    c, out, count, last = _split_outputs(M, N, split, grid[0], a.device, out_dtype, glu)
    w8_mma_kernel[grid](a, w, w_scale, bias if bias is not None else w_scale, c, out, count, M, N, K, a.stride(0),
                        w.stride(0), c.stride(-2), W_SCALE=1 if w_scale.numel() > 1 else 0, HAS_BIAS=bias is not None,
                        PARTIAL=split > 1, LAST_SUMS=last, ASM=not _INTERPRET, GLU=glu, **cfg)
    return out if last or glu else split_sum(c, out_dtype)


def w4_f16mma(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, w_kind: int = W_INT4, w_zero=None,
              bias=None, group: int = 0, out_dtype=None, config: dict | None = None, a_scale=None,
              **_) -> torch.Tensor | None:
    """W4A16 ``a (M <= 64, K) bf16/fp16 @ dequant(w).T (+ bias)`` through :func:`w4_f16mma_kernel`; None when
    the operands do not fit it (other weight kinds, activation codes or other activation dtypes, more than 64
    rows, a group not a multiple of 32, a layout other than nibble-packed (N, K/2) with (N, K/group) scales)."""
    M, K = a.shape
    if w_kind != W_INT4 or a_scale is not None or a.dtype not in (torch.bfloat16, torch.float16) \
            or not 0 < M <= 64 or a.stride(1) != 1 or not _nibble_layout_fits(K, w, w_scale, w_zero, group):
        return None
    N = w.shape[0]
    out_dtype = out_dtype or a.dtype
    cfg = {"BLOCK_N": 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3, **(config or {})}
    cfg.pop("BLOCK_K", None)  # the loop step is one group
    cfg["BLOCK_M"] = 16 if M <= 16 else 32 if M <= 32 else 64
    split = max(1, min(cfg["SPLIT_K"], K // group))
    cfg["SPLIT_K"] = split
    grid = (-(-M // cfg["BLOCK_M"]) * -(-N // cfg["BLOCK_N"]), split)
    c, out, count, last = _split_outputs(M, N, split, grid[0], a.device, out_dtype)
    w4_f16mma_kernel[grid](a, w, w_scale, w_zero if w_zero is not None else w_scale,
                           bias if bias is not None else w_scale, c, out, count, M, N, K, a.stride(0), w.stride(0),
                           c.stride(-2), w_scale.stride(0), GROUP=group, HAS_ZERO=w_zero is not None,
                           HAS_BIAS=bias is not None, PARTIAL=split > 1, FP16=a.dtype == torch.float16,
                           LAST_SUMS=last, ASM=not _INTERPRET, **cfg)
    return out if last else split_sum(c, out_dtype)


#: :func:`w4_i8mma`'s tile options where its caller names none
W4_I8MMA_TILES = {"BLOCK_N": 128, "SPLIT_K": 2, "GPS": 4, "num_warps": 4, "num_stages": 3}


def w4_i8mma(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, w_kind: int = W_INT4, w_zero=None,
             bias=None, group: int = 0, out_dtype=None, config: dict | None = None, a_scale=None,
             pieces=None, gated: bool = False, glu: bool = False, **_) -> torch.Tensor | None:
    """W4A16 ``a (M <= 4, K) bf16/fp16 @ dequant(w).T (+ bias)`` in two launches: :func:`int8_pieces_kernel`
    (the activation's int8 pieces, one program per step of ``GPS`` groups) and :func:`w4_i8mma_kernel`. None when
    the operands do not fit it (other weight kinds, activation codes or other activation dtypes, more
    than 4 rows, a group not a multiple of 32 or over 1024, a layout other than nibble-packed (N, K/2) with
    (N, K/group) scales). ``GPS`` (1, 2 or 4) is lowered until it divides the groups and leaves each activation
    row its four MMA rows. ``pieces``: ``(P, RS, XS)`` made beforehand for one row and four groups per step
    (``hadamard_triton.hadamard_pieces``: QuaRot's online R4 with the pieces in its epilogue); then ``a`` gives
    only the shapes. ``gated``: ``a`` (M, 2 K) holds a gated MLP's gate|up pairs and the product is of
    ``silu(gate) * up`` (the pieces launch computes it; ``generation.prepare``'s SiLU·mul into the down projection).
    ``glu``: the product's own ``silu(gate) * up`` (M, N / 2) as :func:`wq_mm`'s."""
    M, K = a.shape
    if gated:
        if pieces is not None or K % 2:
            return None
        K //= 2
    if w_kind != W_INT4 or a_scale is not None or a.dtype not in (torch.bfloat16, torch.float16) \
            or not 0 < M <= 4 or a.stride(1) != 1 or group > 1024 \
            or not _nibble_layout_fits(K, w, w_scale, w_zero, group):
        return None
    N = w.shape[0]
    out_dtype = out_dtype or a.dtype
    cfg = {**W4_I8MMA_TILES, **(config or {})}
    for k in ("BLOCK_K", "BLOCK_M"):
        cfg.pop(k, None)
    gps = cfg["GPS"]
    while gps > 1 and ((K // group) % gps or M > 4 // gps):
        gps //= 2
    cfg["GPS"] = gps
    steps = K // (group * gps)
    if glu and (gated or not glu_fits(N, cfg["BLOCK_N"], max(1, min(cfg["SPLIT_K"], steps)))):
        return None
    if pieces is not None:
        if gps != 4 or M != 1 or pieces[0].shape != (steps, 16, group * gps):
            return None
        pieces, rs, xs = pieces
    else:
        pieces, rs, xs = empty_pieces(steps, group * gps, a.device)
        int8_pieces_kernel[(steps,)](a, pieces, rs, xs, M, a.stride(0), K, GROUP=group, GPS=gps, GATED=gated,
                                     num_warps=4)
    split = max(1, min(cfg["SPLIT_K"], steps))
    cfg["SPLIT_K"] = split
    grid = (-(-N // cfg["BLOCK_N"]), split)
    c, out, count, last = _split_outputs(M, N, split, grid[0], a.device, out_dtype, glu)
    w4_i8mma_kernel[grid](pieces, rs, xs, w, w_scale, w_zero if w_zero is not None else w_scale,
                          bias if bias is not None else w_scale, c, out, count, M, N, K, w.stride(0), c.stride(-2),
                          w_scale.stride(0), GROUP=group, HAS_ZERO=w_zero is not None,
                          HAS_BIAS=bias is not None, PARTIAL=split > 1, LAST_SUMS=last, ASM=not _INTERPRET, GLU=glu,
                          **cfg)
    return out if last or glu else split_sum(c, out_dtype)


def empty_pieces(steps: int, step: int, device):
    """Unfilled ``(P, RS, XS)`` for :func:`w4_i8mma_kernel`'s left operand: ``steps`` steps of ``step`` columns
    (int8 (steps, 16, step), fp32 (steps, 16) twice), for the launches that make the pieces."""
    return (torch.empty((steps, 16, step), device=device, dtype=torch.int8),
            torch.empty((steps, 16), device=device, dtype=torch.float32),
            torch.empty((steps, 16), device=device, dtype=torch.float32))


def add_rms_norm_pieces(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group: int):
    """``(x + residual, (P, RS, XS))`` for one row (1, K) (bf16 / fp16; ``weight`` (K,) of the same dtype): the sum,
    and :func:`w4_i8mma`'s pieces (four groups of ``group`` per step) of the row's RMSNorm ``weight * norm(sum)``, in
    one launch (:func:`add_rms_norm_pieces_kernel`; ``K`` whole steps, at most ``int4_mm.ADD_NORM_MAX_K``). For
    ``w4_i8mma(..., pieces=...)``."""
    K = x.shape[-1]
    step = 4 * group
    if x.dtype not in (torch.bfloat16, torch.float16) or residual.dtype != x.dtype or weight.dtype != x.dtype \
            or x.numel() != K or residual.numel() != K or weight.numel() != K or not add_norm_width_fits(K, group):
        raise ValueError(f"add_rms_norm_pieces takes one {K}-wide bf16/fp16 row, its residual and norm weight of "
                         f"the same dtype, K a multiple of {step} and at most {ADD_NORM_MAX_K}")
    steps = K // step
    x, residual, weight = (t.reshape(K).contiguous() for t in (x, residual, weight))
    s = torch.empty((1, K), device=x.device, dtype=x.dtype)
    P, RS, XS = empty_pieces(steps, step, x.device)
    add_rms_norm_pieces_kernel[(steps,)](x, residual, weight, s, P, RS, XS, K, float(eps), GROUP=group,
                                         BLOCK_K=triton.next_power_of_2(K), num_warps=4)
    return s, (P, RS, XS)


def scale_epilogue(acc: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor, bias, out_dtype) -> torch.Tensor:
    """``acc (M, N) int32 * a_scale (M,1 or 1) * w_scale (N or 1) (+ bias)`` in one pass."""
    M, N = acc.shape
    c = torch.empty((M, N), device=acc.device, dtype=out_dtype)
    bm, bn = 32, 128
    grid = (-(-M // bm), -(-N // bn))
    scale_epilogue_kernel[grid](acc, a_scale, w_scale, bias if bias is not None else w_scale, c, M, N,
                              acc.stride(0), c.stride(0), SA_ROW=a_scale.numel() > 1, SW_COL=w_scale.numel() > 1,
                              HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return c


def dequantize_weight(w: torch.Tensor, w_scale: torch.Tensor, *, w_kind: int, K: int, w_zero=None, group: int = 0,
                      out_dtype=torch.bfloat16) -> torch.Tensor:
    """int8 (N, K) with per-channel/one scale, or int4-packed (N, K/2) with group scales -> float (N, K)."""
    N = w.shape[0]
    out = torch.empty((N, K), device=w.device, dtype=out_dtype)
    bn, bk = 32, 128
    grid = (-(-N // bn), -(-K // bk))
    dequant_kernel[grid](w, w_scale, w_zero if w_zero is not None else w_scale, out, N, K, max(group, 1), w.stride(0),
                       w_scale.stride(0) if w_scale.dim() == 2 else 0, W_KIND=w_kind,
                       W_SCALE=2 if w_kind == W_INT4 else (1 if w_scale.numel() > 1 else 0),
                       HAS_ZERO=w_zero is not None, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return out
