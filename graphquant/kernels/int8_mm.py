"""int8 linears: W8A8 (int8 activation codes x int8 weights) and W8A16 (int8 weights, float input).

Device dispatch, all results ``(..., N)`` in ``out_dtype``:

==========  ===========================================  =========================================
path        CUDA                                         CPU
==========  ===========================================  =========================================
W8A8        M <= ``SKINNY_M``: the decode kernel         ``torch._int_mm`` + fp32 scale epilogue
            ``quant_triton.decode_choice`` picks
            (``gemv`` on CUDA cores or ``wq_mm``, an
            int8 tensor-core dot, split-K); else
            ``torch._int_mm`` (cuBLASLt) + Triton
            scale epilogue, or with
            ``PREFILL_TRITON`` (Hopper) one Triton
            kernel (``int8_gemm``, scales fused)
W8A16       M <= ``WEIGHT_ONLY_M``: the decode kernel    ``aten._weight_int8pack_mm``
            (``gemv`` / ``gemv_packed`` on CUDA cores,
            or ``wq_mm``: codes dequantized in
            registers, tensor cores); else Triton
            dequantize + cuBLAS matmul
==========  ===========================================  =========================================

Shapes ``torch._int_mm`` rejects on CUDA (M <= 16, K or N not a multiple of 8) fall back to a
padded call or to an exact float matmul of the codes. A Triton kernel that fails to build is
reported once (``warnings.warn``) and its torch fallback is used from then on.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

SKINNY_M = 16  # W8A8 rows handled by the Triton decode kernels on CUDA (above: cuBLASLt)
#: above ``SKINNY_M`` rows on CUDA, W8A8 runs ``int8_gemm.int8_gemm`` (one Triton kernel, scales fused; bit for
#: bit the result of ``torch._int_mm`` + the scale epilogue) instead of those two. On the H200
#: (``benchmarks/int8_prefill_gpu.py``, results/int8_prefill_gpu.json; 16384 rows of the Llama-3-8B projections):
#: 6.75 ms for one layer's four products against 9.28 ms (``_int_mm`` + epilogue; bf16 10.72, fp8 6.07); the
#: 2-layer prefill 8x2048 per layer 11.05 -> 8.82 ms (results/generate_gpu_ab_switches.json)
PREFILL_TRITON = True
WEIGHT_ONLY_M = 64  # weight-only rows handled by the Triton decode kernels (above: dequantize + cuBLAS)
#: the row buckets of the measured decode-kernel table (``quant_triton.decode_choice``: 1, up to 4, 16, 64 rows); here,
#: Triton-free, so that ``QuantLinear`` can look them up on installs without Triton
M_BUCKETS = (1, 4, 16, 64)


def m_bucket(M: int) -> int:
    """The decode-table bucket of ``M`` rows (the last one for more rows)."""
    return next((b for b in M_BUCKETS if M <= b), M_BUCKETS[-1])


#: a fused gate|up projection whose rows ``generation.prepare`` interleaved in blocks of this many (gate rows
#: ``16 b .. 16 b + 15``, then the matching up rows, then the next block): the linear ops' ``glu=True`` returns
#: ``silu(gate) * up`` (:func:`interleaved_glu`), which a decode kernel's output tile can compute itself
#: (``quant_triton.GLU_BLOCK``, the same number)
GLU_BLOCK = 16


def interleaved_glu(y: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a gate|up output ``y`` (..., 2 I) interleaved in ``GLU_BLOCK`` blocks: (..., I), in
    fp32 from ``y``'s values and rounded to ``y``'s dtype once (as Inductor's fused SiLU·mul kernel computes it)."""
    g, u = y.unflatten(-1, (-1, 2, GLU_BLOCK)).float().unbind(-2)
    return (F.silu(g) * u).to(y.dtype).flatten(-2)

_FAILED: set[str] = set()


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem means "no Triton"
        return False
    return True


def triton_kernels(device: torch.device, name: str = ""):
    """The ``graphquant.kernels.quant_triton`` module when its kernels can run on ``device`` (CUDA
    with Triton installed, kernel ``name`` not failed before), else ``None``."""
    if device.type != "cuda" or name in _FAILED or not _triton_importable():
        return None
    from . import quant_triton

    return quant_triton


def _int8_gemm(device: torch.device):
    """``graphquant.kernels.int8_gemm.int8_gemm`` when it can run on ``device`` (a Hopper GPU: its tile needs
    144 KiB of shared memory and was measured there), else None."""
    if triton_kernels(device, "int8_gemm") is None or not _hopper(device):
        return None
    from .int8_gemm import int8_gemm

    return int8_gemm


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _hopper(device: torch.device) -> bool:
    return _capability(device.index if device.index is not None else torch.cuda.current_device())[0] == 9


def guarded(name: str, fast, fallback):
    """Run ``fast()``; if it raises (e.g. the Triton kernel does not build on this GPU), warn once,
    remember the failure and use ``fallback()`` from then on."""
    try:
        return fast()
    except Exception as e:  # noqa: BLE001 - any kernel failure falls back to torch
        if torch.compiler.is_compiling():
            raise
        _FAILED.add(name)
        warnings.warn(f"graphquant: kernel {name!r} failed ({type(e).__name__}: {str(e)[:200]}); using the "
                      "torch fallback for it from now on", RuntimeWarning, stacklevel=3)
        return fallback()


def decode_kernel(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_kind: str, **kwargs):
    """``quant_triton.decode_mm`` for a decode-sized product on CUDA (``w_kind``: "int8", "fp8" or "int4"),
    or None where it does not run: not CUDA, no Triton, no kernel for the shape, or the kernel failed
    before (``guarded`` warns once and the caller's next path runs from then on)."""
    if not a.is_cuda or (qt := triton_kernels(a.device, "decode_mm")) is None:
        return None
    kind = {"int8": qt.W_INT8, "fp8": qt.W_FP8, "int4": qt.W_INT4}[w_kind]
    return guarded("decode_mm", lambda: qt.decode_mm(a, w, w_scale, w_kind=kind, **kwargs), lambda: None)


def _flat(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _row_scale(x_scale: torch.Tensor) -> torch.Tensor:
    """Activation scale as (M, 1) (per token) or (1, 1) (per tensor), fp32."""
    s = x_scale.to(torch.float32)
    return s.reshape(-1, 1) if s.numel() > 1 else s.reshape(1, 1)


def _col_scale(w_scale: torch.Tensor) -> torch.Tensor:
    return w_scale.to(torch.float32).reshape(-1)


def scale_epilogue_torch(acc, sa, sw, bias, out_dtype):
    out = acc.to(torch.float32) * sa * sw.reshape(1, -1)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def _codes_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int8 codes product with int32 semantics on any device/shape (padding M for cuBLASLt)."""
    M, K = a.shape
    N = w.shape[0]
    if a.device.type == "cpu":
        return torch._int_mm(a, w.t())
    if K % 8 == 0 and N % 8 == 0:
        if M > 16:
            return torch._int_mm(a, w.t())
        pad = torch.zeros((32, K), dtype=a.dtype, device=a.device)
        pad[:M] = a
        return torch._int_mm(pad, w.t())[:M]
    # float32 holds every partial sum exactly while |sum| < 2^24, i.e. for K <= 1040 worst case;
    # beyond that the rounding is ~1e-7 relative, below what the scales carry anyway
    return (a.to(torch.float32) @ w.to(torch.float32).t())


def glu_decode(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_kind: str, lead, **kwargs):
    """``silu(gate) * up`` of an interleaved gate|up product (``glu``) from a decode kernel's own epilogue,
    reshaped to ``lead + (N / 2,)``, or None where none runs it (the caller computes the product, then
    :func:`interleaved_glu`)."""
    out = decode_kernel(a, w, w_scale, w_kind, glu=True, **kwargs)
    return None if out is None else out.reshape(*lead, w.shape[0] // 2)


def int8_linear(xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype, glu: bool = False) -> torch.Tensor:
    """``(xq * x_scale) @ (w * w_scale).T + bias``: int8 codes in, integer accumulation. ``glu``: ``silu(gate) * up``
    of an interleaved gate|up weight (:func:`interleaved_glu`)."""
    N, K = w.shape
    lead = xq.shape[:-1]
    a = _flat(xq)
    M = a.shape[0]
    sa, sw = _row_scale(x_scale), _col_scale(w_scale)
    if glu:
        if 0 < M <= SKINNY_M and (h := glu_decode(a, w, sw, "int8", lead, a_scale=sa, bias=bias,
                                                   out_dtype=out_dtype)) is not None:
            return h
        return interleaved_glu(int8_linear(xq, x_scale, w, w_scale, bias, out_dtype))

    def reference():
        return scale_epilogue_torch(_codes_matmul(a, w), sa, sw, bias, out_dtype)

    if M == 0:
        out = torch.empty((0, N), dtype=out_dtype, device=a.device)
    elif M <= SKINNY_M and (out := decode_kernel(a, w, sw, "int8", a_scale=sa, bias=bias,
                                                 out_dtype=out_dtype)) is not None:
        pass
    elif PREFILL_TRITON and a.is_cuda and (gemm := _int8_gemm(a.device)) is not None:
        out = guarded("int8_gemm", lambda: gemm(a, w, sa, sw, bias, out_dtype), reference)
    elif a.is_cuda and M > 16 and K % 8 == 0 and N % 8 == 0:
        acc = torch._int_mm(a, w.t())
        qt = triton_kernels(a.device, "scale_epilogue")
        if qt is not None:
            out = guarded("scale_epilogue", lambda: qt.scale_epilogue(acc, sa, sw, bias, out_dtype),
                          lambda: scale_epilogue_torch(acc, sa, sw, bias, out_dtype))
        else:
            out = scale_epilogue_torch(acc, sa, sw, bias, out_dtype)
    else:
        out = reference()
    return out.reshape(*lead, N)


def dequantize_int8(w: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w * w_scale`` computed in fp32 and cast, exactly as ``graphquant::dequantize`` does."""
    if w.is_cuda and (qt := triton_kernels(w.device, "dequant")) is not None:
        return guarded("dequant", lambda: qt.dequantize_weight(w, _col_scale(w_scale), w_kind=qt.W_INT8,
                                                              K=w.shape[1], out_dtype=dtype),
                       lambda: dequantize_int8_torch(w, w_scale, dtype))
    return dequantize_int8_torch(w, w_scale, dtype)


def dequantize_int8_torch(w, w_scale, dtype):
    s = w_scale.to(torch.float32)
    return (w.to(torch.float32) * (s.reshape(-1, 1) if s.numel() > 1 else s)).to(dtype)


def int8_weight_only_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                            bias: torch.Tensor | None, glu: bool = False) -> torch.Tensor:
    """W8A16: ``x @ (w * w_scale).T + bias`` with ``x`` float, ``w`` int8 (N, K). ``glu`` as :func:`int8_linear`'s."""
    N, K = w.shape
    lead = x.shape[:-1]
    a = _flat(x)
    M = a.shape[0]
    if glu:
        if 0 < M <= WEIGHT_ONLY_M and a.dtype in (torch.float16, torch.bfloat16) and (
                h := glu_decode(a, w, _col_scale(w_scale), "int8", lead, bias=bias, out_dtype=a.dtype)) is not None:
            return h
        return interleaved_glu(int8_weight_only_linear(x, w, w_scale, bias))

    def reference():
        return F.linear(a, dequantize_int8(w, w_scale, a.dtype), bias)

    if M == 0:
        out = a.new_empty((0, N))
    elif (M <= WEIGHT_ONLY_M and a.dtype in (torch.float16, torch.bfloat16)
          and (out := decode_kernel(a, w, _col_scale(w_scale), "int8", bias=bias, out_dtype=a.dtype)) is not None):
        pass
    elif a.device.type == "cpu" and a.dtype in (torch.float32, torch.bfloat16, torch.float16):
        scales = w_scale.to(a.dtype).reshape(-1).expand(N).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(a, w, scales)
        if bias is not None:
            out = out + bias
    else:
        out = reference()
    return out.reshape(*lead, N)
