"""Triton kernels for ``graphquant::decode_attention``: one new query token per sequence attends over a
KV cache, grouped-query heads read their shared K/V once (no ``repeat_kv`` copies).

Imported lazily (on the first CUDA call of the op), so CPU-only installs never import Triton.

Split-KV ("flash-decoding"): program ``(b * H_kv + h, split)`` takes the ``G = H_q / H_kv`` query
heads of KV head ``h`` (padded to 16 rows for the tensor cores) over one chunk of cache positions,
with an online softmax in fp32; a second kernel merges the chunks' partial results (skipped when one
chunk covers the cache). Positions the mask drops are never loaded when a whole block is dropped,
so the empty tail of a static cache costs only its mask reads.

Numerics follow flash attention: ``q·k`` on the tensor cores with fp32 accumulation, the softmax
scale and the mask applied in fp32, probabilities rounded to the input dtype for ``p·v``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .quant_triton import _sm_count

__all__ = ["decode_attention_triton", "supports", "split_plan"]

BLOCK_S = 32           # cache positions per inner step
MIN_ROWS = 16          # query rows of one tensor-core product (G padded up to it)
# programs per multiprocessor the split aims at, and at most this many chunks per (sequence, KV head). H200,
# Llama-3-8B heads (8 KV), 16 layers' calls in one CUDA graph, per call (benchmarks/decode_attention_gpu.py --splits,
# results/decode_attention_splits.json): batch 16 over 384 slots 15.6 us at 3 chunks (the plan for 2 per SM), 12.9 us
# at 6 (the plan for 6 per SM); over 4096 slots 106.9 us at 3, 76.2 at 6; batch 1 keeps its 12 chunks at 384 slots
# (5.4 us, the fastest there) and its 32 at 4096 (the cap)
TARGET_PROGRAMS = 6
MAX_SPLITS = 32
MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2

# Triton's CPU interpreter (TRITON_INTERPRET=1, used to test the kernels without a GPU) mishandles bf16
# dots; there the operands are widened to fp32 (same products, exact sums of bf16 values).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def decode_attention_split_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, ml_ptr, out_ptr,
                  S, G, HKV, CHUNK, SPLITS, scale,
                  sqb, sqh, skb, skh, sks, svb, svh, svs, smb, sms,
                  D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, MASK: tl.constexpr,
                  DIRECT: tl.constexpr, OP: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    kvh = pid % HKV
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    rows = g < G
    heads = kvh * G + g
    q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + d[None, :], mask=rows[:, None], other=0.0).to(OP)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, S)
    k_base = k_ptr + b * skb + kvh * skh
    v_base = v_ptr + b * svb + kvh * svh
    for s0 in range(start, end, BLOCK):
        pos = s0 + tl.arange(0, BLOCK)
        keep = pos < end
        if MASK == 1:
            keep = keep & (tl.load(m_ptr + b * smb + pos * sms, mask=keep, other=0) != 0)
        if tl.max(keep.to(tl.int32), 0) > 0:  # a block the mask drops entirely is not read
            k = tl.load(k_base + pos[:, None] * sks + d[None, :], mask=keep[:, None], other=0.0).to(OP)
            s = tl.dot(q, tl.trans(k)) * scale
            if MASK == 2:
                s = s + tl.load(m_ptr + b * smb + pos * sms, mask=keep, other=0.0).to(tl.float32)[None, :]
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_ref[:, None])
            alpha = tl.exp(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + pos[:, None] * svs + d[None, :], mask=keep[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(OP), v.to(OP))
            m_i = m_new
    HQ = HKV * G
    if DIRECT:  # one chunk: normalise and store (B, 1, H_q, D)
        res = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out = out_ptr + (b * HQ + heads)[:, None] * D + d[None, :]
        tl.store(out, res.to(out_ptr.dtype.element_ty), mask=rows[:, None])
    else:
        part = (b * HQ + heads) * SPLITS + split
        tl.store(o_ptr + part[:, None] * D + d[None, :], acc, mask=rows[:, None])
        tl.store(ml_ptr + part * 2, m_i, mask=rows)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=rows)


@triton.jit
def decode_attention_combine_kernel(o_ptr, ml_ptr, out_ptr, SPLITS, D: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
    row = tl.program_id(0)  # b * H_q + head
    sp = tl.arange(0, BLOCK_SPLITS)
    d = tl.arange(0, D)
    valid = sp < SPLITS
    part = row * SPLITS + sp
    m = tl.load(ml_ptr + part * 2, mask=valid, other=float("-inf"))
    l = tl.load(ml_ptr + part * 2 + 1, mask=valid, other=0.0)
    o = tl.load(o_ptr + part[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
    top = tl.max(m, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(m - top)
    den = tl.sum(w * l, 0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(den == 0.0, 1.0, den)
    tl.store(out_ptr + row * D + d, res.to(out_ptr.dtype.element_ty))


def supports(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Shapes and dtypes the kernel takes: 16/32/64/128/256-wide heads, 16-bit floats, H_q a multiple of H_kv."""
    d = query.shape[-1]
    return (query.dtype in (torch.bfloat16, torch.float16) and key.dtype == query.dtype
            and d in (16, 32, 64, 128, 256) and query.shape[1] % key.shape[1] == 0)


def split_plan(batch: int, kv_heads: int, positions: int, sms: int = 132) -> tuple[int, int]:
    """(chunk, splits): cache positions per program and chunks per (sequence, KV head), about
    ``TARGET_PROGRAMS`` programs per multiprocessor, at most ``MAX_SPLITS`` chunks and at least one ``BLOCK_S``
    block per chunk."""
    blocks = triton.cdiv(positions, BLOCK_S)
    want = max(1, min(MAX_SPLITS, triton.cdiv(TARGET_PROGRAMS * sms, batch * kv_heads)))
    per = triton.cdiv(blocks, min(blocks, want))
    chunk = per * BLOCK_S
    return chunk, triton.cdiv(positions, chunk)


def decode_attention_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask, scale: float,
                            splits: int | None = None) -> torch.Tensor:
    """``query`` (B, H_q, 1, D), ``key``/``value`` (B, H_kv, S, D), ``mask`` None, (B, S) bool (True: attend)
    or (B, S) additive float; -> (B, 1, H_q, D) in the query's dtype. ``splits`` forces the chunk count."""
    B, HQ, _, D = query.shape
    HKV, S = key.shape[1], key.shape[2]
    G = HQ // HKV
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    q = query if query.stride(-1) == 1 else query.contiguous()
    if splits is None:
        if q.is_cuda:
            chunk, splits = split_plan(B, HKV, S, _sm_count(q.device.index if q.device.index is not None
                                                            else torch.cuda.current_device()))
        else:  # Triton's CPU interpreter
            chunk, splits = split_plan(B, HKV, S)
    else:
        chunk = triton.cdiv(triton.cdiv(S, splits), BLOCK_S) * BLOCK_S
        splits = triton.cdiv(S, chunk)
    if mask is None:
        kind, m, smb, sms = MASK_NONE, q, 0, 0
    else:
        kind = MASK_BOOL if mask.dtype == torch.bool else MASK_ADD
        m = mask.view(torch.uint8) if kind == MASK_BOOL else mask
        smb, sms = m.stride(0), m.stride(1)
    out = torch.empty(B, 1, HQ, D, dtype=query.dtype, device=query.device)
    direct = splits == 1
    if direct:
        o_part = ml = out
    else:
        o_part = torch.empty(B * HQ * splits, D, dtype=torch.float32, device=query.device)
        ml = torch.empty(B * HQ * splits, 2, dtype=torch.float32, device=query.device)
    op = tl.float32 if _INTERPRET else (tl.bfloat16 if query.dtype == torch.bfloat16 else tl.float16)
    decode_attention_split_kernel[(B * HKV, splits)](
        q, key, value, m, o_part, ml, out, S, G, HKV, chunk, splits, float(scale),
        q.stride(0), q.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), smb, sms,
        D=D, BLOCK_G=max(MIN_ROWS, triton.next_power_of_2(G)), BLOCK=BLOCK_S, MASK=kind, DIRECT=direct, OP=op,
        num_warps=4)
    if not direct:
        decode_attention_combine_kernel[(B * HQ,)](o_part, ml, out, splits, D=D,
                                                   BLOCK_SPLITS=triton.next_power_of_2(splits), num_warps=4)
    return out
