"""fp8 e4m3 W8A8 linears: ``torch._scaled_mm`` (cuBLASLt) and a Triton kernel for decode.

``fp8_linear(xq, x_scale, w, w_scale, bias, out_dtype)``: ``xq`` fp8 codes with one scale per
row (per-token) or one scale (per-tensor); ``w`` fp8 (N, K) with one scale per output channel or
one. On CUDA:

- M <= ``SKINNY_M`` (decode): the kernel ``quant_triton.decode_choice`` picks: Triton ``gemv`` (CUDA
  cores) or ``wq_mm`` (fp8 tensor-core dot, fp32 accumulation, split-K);
- otherwise ``torch._scaled_mm``: per-tensor scales when both are single (any output dtype),
  row-wise scales otherwise (``scale_a`` (M, 1), ``scale_b`` (1, N); Hopper needs a bf16 output,
  other output dtypes are cast from it). ``USE_FAST_ACCUM`` (off) selects cuBLAS's fast fp8 accumulation.

On CPU ``torch._scaled_mm`` is never called: it is orders of magnitude slower than a float matmul
(14 s for one 512x384x1152 product in the issue-12 measurement), so the codes are multiplied as
floats (exact: fp8 values are exactly representable in fp32). ``lower=True`` keeps fp8 Linears on
CPU as fake-quant anyway (see ``graphquant.lowering.lower``).
"""
from __future__ import annotations

import torch

from .int8_mm import (_col_scale, _flat, _row_scale, decode_kernel, glu_decode, guarded, interleaved_glu,
                      scale_epilogue_torch)

SKINNY_M = 16
#: cuBLAS fp8 "fast accumulation" (no periodic fp32 promotion): a few % faster on Hopper, but the
#: error grows with K (over 1e-2 relative at K = 14336 in our tests), so it is opt-in
USE_FAST_ACCUM = False


def _reference(a, sa, w, sw, bias, out_dtype):
    acc = a.to(torch.float32) @ w.to(torch.float32).t()
    return scale_epilogue_torch(acc, sa, sw, bias, out_dtype)


_NO_FAST_ROWWISE = []  # set once fast accumulation is refused for row-wise scales


def _scaled_mm(a, sa, w, sw, bias, out_dtype):
    fast = USE_FAST_ACCUM and a.is_cuda
    rowwise = not (sa.numel() == 1 and sw.numel() == 1)
    if rowwise and fast and not _NO_FAST_ROWWISE:
        try:
            return _scaled_mm_call(a, sa, w, sw, bias, out_dtype, True)
        except RuntimeError:
            _NO_FAST_ROWWISE.append(True)
    return _scaled_mm_call(a, sa, w, sw, bias, out_dtype, fast and not rowwise)


def _scaled_mm_call(a, sa, w, sw, bias, out_dtype, fast):
    M, N = a.shape[0], w.shape[0]
    if sa.numel() == 1 and sw.numel() == 1:
        out = torch._scaled_mm(a, w.t(), scale_a=sa.reshape(()), scale_b=sw.reshape(()), out_dtype=out_dtype,
                               use_fast_accum=fast)
    else:
        mm_dtype = torch.bfloat16 if a.is_cuda else torch.float32
        out = torch._scaled_mm(a, w.t(), scale_a=sa.expand(M, 1).contiguous(),
                               scale_b=sw.reshape(1, -1).expand(1, N).contiguous(), out_dtype=mm_dtype,
                               use_fast_accum=fast)
    if bias is not None:
        out = out.to(torch.float32) + bias.to(torch.float32)
    return out.to(out_dtype)


def fp8_linear(xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype, glu: bool = False) -> torch.Tensor:
    """``(xq * x_scale) @ (w * w_scale).T + bias`` with fp8 e4m3 codes. ``glu``: ``silu(gate) * up`` of an
    interleaved gate|up weight (``int8_mm.interleaved_glu``)."""
    N, K = w.shape
    lead = xq.shape[:-1]
    a = _flat(xq)
    M = a.shape[0]
    sa, sw = _row_scale(x_scale), _col_scale(w_scale)
    if glu:
        if 0 < M <= SKINNY_M and (h := glu_decode(a, w, sw, "fp8", lead, a_scale=sa, bias=bias,
                                                   out_dtype=out_dtype)) is not None:
            return h
        return interleaved_glu(fp8_linear(xq, x_scale, w, w_scale, bias, out_dtype))

    def reference():
        return _reference(a, sa, w, sw, bias, out_dtype)

    def scaled():
        return guarded("_scaled_mm", lambda: _scaled_mm(a, sa, w, sw, bias, out_dtype), reference)

    if M == 0:
        out = torch.empty((0, N), dtype=out_dtype, device=a.device)
    elif M <= SKINNY_M and (out := decode_kernel(a, w, sw, "fp8", a_scale=sa, bias=bias,
                                                 out_dtype=out_dtype)) is not None:
        pass
    elif "_scaled_mm" not in _failed() and a.is_cuda and K % 16 == 0 and N % 16 == 0:
        out = scaled()
    else:
        out = reference()
    return out.reshape(*lead, N)


def _failed():
    from .int8_mm import _FAILED

    return _FAILED
