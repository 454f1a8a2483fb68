"""Activation quantization for the W8A8 kernels: float -> int8 / fp8 codes plus scales.

The numerics are ``graphquant.quant.fake_quant``'s (same scale formula, same rounding), so a
lowered linear sees exactly the codes its fake-quant twin rounded to. On CUDA the common specs
(int8 symmetric or fp8 e4m3, per-token dynamic or per-tensor static, ``half_even`` rounding, float
scales) run one Triton kernel per call; everything else runs the fake-quant math in torch.

The lowered graph calls :func:`quantize_act_dynamic_node` / :func:`quantize_act_static_node`:
in eager they run the custom ops ``graphquant::quantize_act_*`` (one Triton kernel); under
``torch.compile`` (and export) the common specs are traced as plain torch ops instead, so Inductor
fuses the quantization into the kernel that produces the activation (RMSNorm, SiLU·mul). Both give
fake-quant's codes.

``hadamard=True`` first applies the online Hadamard (QuaRot R4) that preceded the quantizer in the
fake-quant graph, ``graphquant::hadamard_transform(x, False)``, then quantizes its output (under
``torch.compile`` the quantization is traced, so Inductor makes it one kernel). A fused kernel that does
both (``hadamard_triton.hadamard_quantize``) runs at decode sizes (``FUSED_FEW_ROWS_STATIC`` /
``FUSED_FEW_ROWS_DYNAMIC``: the tiled transform with the quantization in its epilogue); for more rows its
persistent kernel runs from ``FUSED_MIN_ROWS`` rows (prefill; see there).
"""
from __future__ import annotations

import torch

from ..config import Dtype, QSchemeType, RoundType, ScaleType
from ..kernels.int8_mm import _FAILED, guarded, triton_kernels
from ..quant import fake_quant as FQ


def _triton_spec(spec) -> bool:
    return (spec.round_method == RoundType.half_even and spec.scale_type == ScaleType.float
            and ((spec.dtype == Dtype.int8 and spec.symmetric) or spec.dtype == Dtype.fp8_e4m3))


#: rows from which the fused Hadamard + quantization kernel (the persistent one) replaces the transform followed
#: by the quantization (None: never). H200, 14336 (Llama-3-8B R4), 16384 rows (8 x 2048 prefill), CUDA-graph
#: replay: with the exact codes sequence the fused kernel took 1.07-1.43 ms (its fastest of five launch shapes)
#: against 0.86-0.95 ms for the transform + ``quantize_rows`` (results/hadamard_gpu_quantize_*.json; 1.09-1.44
#: against 0.86-0.95 again on 2026-11-30); with ``quant_triton.FAST_CODES`` int8 0.64-0.66 ms against
#: 0.68-0.74 ms (results/hadamard_gpu_fast_codes_16384.txt; fp8 not reached in that call). In the model
#: (generate_gpu.py, 2-layer Llama-3-8B shapes, FAST_CODES and this set to 4096 against neither;
#: results/generate_gpu_ab_fast_codes.json):
#: fp8 static + QuaRot prefill 8.14 -> 7.99 ms per layer (its cost over fp8 static 9.1% -> 6.4%), int8 + QuaRot
#: 9.17 -> 9.14 ms. Only 16384 rows were timed; at 1 and 16 rows the tiled kernel below runs instead
FUSED_MIN_ROWS: int | None = 4096

#: at most ``hadamard_triton.FEW_ROWS`` rows (decode), run the tiled transform with the quantization in its
#: epilogue (``hadamard_quantize``): one kernel instead of the transform then an Inductor quantization kernel.
#: Static scale: H200, 14336, CUDA-graph replay, 4.8-5.0 us at 1 and 16 rows, where the transform alone takes
#: 3.9-4.1 us and the transform + ``quantize_rows`` 11.0-13.2 us
#: (benchmarks/results/hadamard_gpu_few_rows_epilogue_*.json).
#: Dynamic scale: the transform stores its tiles and their maxima, a second launch quantizes the tiles under the
#: row's scale; generate_gpu.py, 2-layer Llama-3-8B shapes, decode batch 1, QuaRot's cost over the same scheme
#: without it: fp8 dynamic +1.7%, int8 +3.1% (before: +3.7%, +6.6%; results/generate_gpu_run_e.json; a later
#: run, results/generate_gpu_run_f.json, after ``SPLIT_DYNAMIC_ROWS`` sped up the unrotated rows: +7.8%, +1.2%). A first
#: version whose last program per row quantized the whole row cost +28% instead
#: (results/generate_gpu_dynamic_r4_last_program_tried.json).
FUSED_FEW_ROWS_STATIC = True
FUSED_FEW_ROWS_DYNAMIC = True


def _fused_hadamard_quantize(x: torch.Tensor, static: bool = False):
    """``hadamard_triton.hadamard_quantize`` when it has a kernel for ``x`` and a size rule picks it (CUDA,
    Triton; at least ``FUSED_MIN_ROWS`` rows, or at most ``FEW_ROWS`` rows with ``FUSED_FEW_ROWS_STATIC`` /
    ``FUSED_FEW_ROWS_DYNAMIC`` for the scale's kind), else None."""
    few_switch = FUSED_FEW_ROWS_STATIC if static else FUSED_FEW_ROWS_DYNAMIC
    if FUSED_MIN_ROWS is None and not few_switch:
        return None
    if not x.is_cuda or "hadamard_quantize" in _FAILED or not x.numel() \
            or triton_kernels(x.device, "hadamard_quantize") is None:
        return None
    try:
        from ..kernels import hadamard_triton
    except Exception:  # noqa: BLE001 - Triton present but the module does not import here
        return None
    rows = x.numel() // x.shape[-1]
    few = few_switch and rows <= hadamard_triton.FEW_ROWS
    if not few and (FUSED_MIN_ROWS is None or rows < FUSED_MIN_ROWS):
        return None
    return hadamard_triton.hadamard_quantize if hadamard_triton.fusable(x.shape[-1], x.dtype, rows) else None


def _hadamard(x: torch.Tensor) -> torch.Tensor:
    from .. import hadamard  # noqa: F401  registers graphquant::hadamard_transform

    return torch.ops.graphquant.hadamard_transform(x, False)


def quantize_dynamic(x: torch.Tensor, spec_str: str, hadamard: bool = False):
    """(codes, scale): per-token scale ``x.shape[:-1] + (1,)`` or per-tensor ``()``, fp32."""
    spec = FQ.as_spec(spec_str)
    fast = x.is_cuda and _triton_spec(spec) and spec.qscheme == QSchemeType.per_token
    fp8 = spec.dtype == Dtype.fp8_e4m3
    if fast and hadamard and (fused := _fused_hadamard_quantize(x)) is not None:
        return guarded("hadamard_quantize", lambda: fused(x, fp8, None), lambda: quantize_dynamic(x, spec_str, True))
    if hadamard:
        x = _hadamard(x)
    if fast and (qt := triton_kernels(x.device, "quant_rows")) is not None:
        split = _split_rows(x)
        return guarded("quant_rows", lambda: qt.quantize_rows(x, fp8, split=split), lambda: _dynamic_torch(x, spec))
    return _dynamic_torch(x, spec)


def _dynamic_torch(x, spec):
    q, scale, _ = FQ.dynamic_quantize(x, spec)
    return q, scale.to(torch.float32)


def quantize_static(x: torch.Tensor, scale: torch.Tensor, spec_str: str, hadamard: bool = False) -> torch.Tensor:
    """Codes of ``x`` under a calibrated per-tensor scale."""
    spec = FQ.as_spec(spec_str)
    fast = x.is_cuda and _triton_spec(spec) and scale.numel() == 1
    fp8 = spec.dtype == Dtype.fp8_e4m3
    s = scale.to(torch.float32).reshape(())
    if fast and hadamard and (fused := _fused_hadamard_quantize(x, static=True)) is not None:
        return guarded("hadamard_quantize", lambda: fused(x, fp8, s)[0],
                       lambda: quantize_static(x, scale, spec_str, True))
    if hadamard:
        x = _hadamard(x)
    if fast and (qt := triton_kernels(x.device, "quant_rows")) is not None:
        return guarded("quant_rows", lambda: qt.quantize_rows(x, fp8, static_scale=s)[0],
                       lambda: _static_torch(x, s, spec))
    return _static_torch(x, s, spec)


def _static_torch(x, scale, spec):
    zp = torch.zeros((), dtype=torch.int32, device=x.device)
    return FQ.quantize(x, scale, zp, spec)


def codes_dtype(spec_str: str) -> torch.dtype:
    return FQ.storage_dtype(spec_str)


def scale_shape(x_shape, spec_str: str) -> tuple:
    spec = FQ.as_spec(spec_str)
    return tuple(x_shape[:-1]) + (1,) if spec.qscheme == QSchemeType.per_token else ()


# --------------------------------------------------------------------------- graph-node entry points
_TINY = float(torch.finfo(torch.float32).tiny)


def _inline_spec(spec: str):
    """(fp8, per_token) when ``spec`` can be traced as plain torch ops, else None (string parsing only,
    so Dynamo traces it without touching the spec cache)."""
    parts = spec.split(":")
    if len(parts) < 6 or parts[4] != "float" or parts[5] != "half_even" or parts[1] not in ("per_token", "per_tensor"):
        return None
    if parts[0] == "int8" and parts[2] == "sym":
        return False, parts[1] == "per_token"
    if parts[0] == "fp8_e4m3":
        return True, parts[1] == "per_token"
    return None


def _codes_inline(v: torch.Tensor, fp8: bool) -> torch.Tensor:
    if fp8:
        return v.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return torch.round(v).clamp(-127.0, 127.0).to(torch.int8)


def _fused_under_compile(x: torch.Tensor, hadamard: bool, static: bool = False) -> bool:
    """Whether the fused transform+quantize kernel (one custom-op call) replaces tracing the two under
    compile (Inductor cannot fuse the quantization into the opaque transform): where a size rule of
    :func:`_fused_hadamard_quantize` picks it."""
    return hadamard and _fused_hadamard_quantize(x, static) is not None


#: per-token dynamic scales of a few long rows (``quant_triton.split_rows``: the 14336-wide down_proj input at
#: decode) from ``quantize_rows(split=True)``: two launches over tiles, also under ``torch.compile`` (one custom-op
#: call) where Inductor would fuse the quantization into the SiLU·mul kernel as three kernels, 5.0 us per decode
#: layer on the H200 (results/decode_profile_split_reductions.json). Same codes. A/B in one H200 run
#: (``generate_gpu.py --ab graphquant.lowering.activation.SPLIT_DYNAMIC_ROWS=1``,
#: results/generate_gpu_ab_switches.json), decode batch 1 per layer: fp8 dynamic 0.1021 -> 0.0998 ms, int8 W8A8
#: 0.1024 -> 0.0994 ms; batch 16 and prefill unchanged (within 1%)
SPLIT_DYNAMIC_ROWS = True


def _split_rows(x: torch.Tensor) -> bool:
    if not SPLIT_DYNAMIC_ROWS or not x.is_cuda or not x.dim():
        return False
    from ..kernels.quant_triton import split_rows

    return split_rows(x.numel() // max(x.shape[-1], 1), x.shape[-1])


def _split_under_compile(x: torch.Tensor, hadamard: bool) -> bool:
    """Whether a per-token dynamic quantization of a few long rows runs the split kernels (one custom-op call)
    under compile instead of being traced for Inductor (``SPLIT_DYNAMIC_ROWS``)."""
    return not hadamard and _split_rows(x)


def quantize_act_dynamic_node(x: torch.Tensor, spec: str, hadamard: bool = False):
    """(codes, scale) for a dynamic activation quantizer; see the module docstring."""
    kind = _inline_spec(spec) if torch.compiler.is_compiling() and not _fused_under_compile(x, hadamard) else None
    if kind is not None and kind[1] and _split_under_compile(x, hadamard):  # per token, few long rows
        kind = None
    if kind is None:
        return torch.ops.graphquant.quantize_act_dynamic(x, spec, hadamard)
    fp8, per_token = kind
    if hadamard:
        x = _hadamard(x)
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True) if per_token else xf.abs().amax()
    scale = (amax / (448.0 if fp8 else 127.0)).clamp_min(_TINY)
    return _codes_inline(xf / scale, fp8), scale


def quantize_act_static_node(x: torch.Tensor, scale: torch.Tensor, spec: str, hadamard: bool = False):
    """Codes for a static (calibrated per-tensor scale) activation quantizer."""
    kind = _inline_spec(spec) if (torch.compiler.is_compiling() and scale.numel() == 1
                                  and not _fused_under_compile(x, hadamard, static=True)) else None
    if kind is None:
        return torch.ops.graphquant.quantize_act_static(x, scale, spec, hadamard)
    if hadamard:
        x = _hadamard(x)
    return _codes_inline(x.float() / scale.float(), kind[0])
