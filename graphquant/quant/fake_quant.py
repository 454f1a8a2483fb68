"""Quantization math in plain torch: qparams, quantize, dequantize, fake-quantize.

Every function takes a :class:`~graphquant.config.QuantizationSpec` (or its op string) and works
on any float input dtype; arithmetic is float32 and no autograd graph is needed.

Shapes of ``scale``/``zero_point`` (the *qparam shape* of a tensor ``x``, :func:`qparam_shape`):

=============  ====================================================================
per_tensor     ``()``
per_channel    ``(x.shape[ch_axis],)`` (e.g. ``(out_features,)`` for a Linear weight)
per_group      ``x.shape`` with the group axis (``ch_axis``, default -1) divided by
               ``group_size``, rounded up: ``(out, ceil(in / group_size))`` for a Linear weight.
               When ``group_size`` does not divide the axis the last group is shorter
               (compressed-tensors / vLLM do the same: 576 columns in groups of 128 are four
               groups of 128 and one of 64)
MX             as per_group, with ``group_size`` the block size (32)
per_token      ``x.shape[:-1] + (1,)`` (one scale per row over the last dim)
=============  ====================================================================

``scale`` is float32 and positive (an all-zero range gets the smallest normal float32, so
nothing divides by zero); ``zero_point`` is int32 (0 for symmetric signed and float formats,
``2^(b-1)`` for symmetric unsigned). ``quantize`` rounds ``x / scale`` (ties in units of the
scale, relative to real zero) and adds the zero point; zero points are rounded half-to-even.

Quantized storage (:func:`storage_dtype`): signed ints in int8, unsigned in uint8 (int4/int2
unpacked, one per byte); fp8 in ``torch.float8_e4m3fn``/``float8_e5m2``; fp6/fp4 as float32
holding exactly representable values; MX elements like their element format (fp8 dtypes, or
float32 for fp6/fp4/MXINT8, whose elements are the values ``k/64``); bf16/fp16 casts as
themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import QSchemeType, QuantizationSpec, ScaleType
from ..errors import ConfigError
from . import formats as F

__all__ = [
    "QuantizedWeight", "as_spec", "storage_dtype", "qparam_shape", "minmax", "compute_qparams",
    "quantize", "dequantize", "fake_quantize", "dynamic_qparams", "dynamic_quantize",
    "dynamic_fake_quantize", "quantize_weight",
]

#: Smallest scale ever produced (smallest normal float32): keeps ``x / scale`` finite-or-clamped.
SCALE_EPS = torch.finfo(torch.float32).tiny


def as_spec(spec: QuantizationSpec | str) -> QuantizationSpec:
    """A spec from a spec or its op string (``QuantizationSpec.to_op_str()``)."""
    return QuantizationSpec.from_op_str(spec) if isinstance(spec, str) else spec


def storage_dtype(spec: QuantizationSpec | str) -> torch.dtype:
    """The dtype :func:`quantize` returns for ``spec``."""
    spec = as_spec(spec)
    if spec.is_cast:
        return F.CAST_DTYPES[spec.dtype.value]
    if spec.is_integer_format:
        return F.int_format(spec.dtype).storage_dtype
    if spec.is_mx:
        return F.mx_element_format(spec.mx_element_dtype).storage_dtype
    return F.float_format(spec.dtype).storage_dtype


# =========================================================================== shapes and ranges
def _axis(spec: QuantizationSpec, ndim: int) -> int:
    if not -ndim <= spec.ch_axis < ndim:
        raise ConfigError(f"ch_axis={spec.ch_axis} is out of range for a {ndim}-D tensor")
    return spec.ch_axis % ndim


def _n_groups(shape, spec: QuantizationSpec) -> tuple[int, int]:
    """(axis, number of groups) for per_group / MX. A per_group axis that ``group_size`` does not
    divide ends with one shorter group; MX blocks must divide the axis."""
    if len(shape) == 0:
        raise ConfigError("per_group/MX quantization needs a tensor with at least one dimension")
    a = _axis(spec, len(shape))
    n, g = shape[a], spec.group_size
    if n % g and spec.is_mx:
        raise ConfigError(f"MX block size={g} does not divide dim {a} (size {n}) of a tensor of shape "
                          f"{tuple(shape)}: choose a block size that divides {n}, or exclude this layer")
    return a, -(-n // g)


def qparam_shape(shape, spec: QuantizationSpec | str) -> tuple[int, ...]:
    """Shape of ``scale``/``zero_point`` for a tensor of ``shape`` (module table)."""
    spec = as_spec(spec)
    shape = tuple(shape)
    qs = spec.qscheme
    if spec.is_cast or qs == QSchemeType.per_tensor:
        return ()
    if qs == QSchemeType.per_channel:
        return (shape[_axis(spec, len(shape))],)
    if qs == QSchemeType.per_token:
        return shape[:-1] + (1,)
    a, n = _n_groups(shape, spec)
    return shape[:a] + (n,) + shape[a + 1:]


def _to_groups(x: torch.Tensor, spec: QuantizationSpec) -> tuple[torch.Tensor, int]:
    """``x`` with the group axis moved last and split into ``(..., n_groups, group_size)``.

    A shorter last group is padded by repeating its last element (which changes neither its min
    nor its max); :func:`_from_groups` drops the padding again."""
    a, n = _n_groups(x.shape, spec)
    xt = x.movedim(a, -1)
    pad = n * spec.group_size - xt.shape[-1]
    if pad:
        xt = torch.cat([xt, xt[..., -1:].expand(*xt.shape[:-1], pad)], dim=-1)
    return xt.reshape(*xt.shape[:-1], n, spec.group_size), a


def _from_groups(y: torch.Tensor, a: int, size: int) -> torch.Tensor:
    """Inverse of :func:`_to_groups` for an axis of ``size`` elements."""
    return y.flatten(-2)[..., :size].movedim(-1, a)


def _group_param(p: torch.Tensor, x: torch.Tensor, a: int) -> torch.Tensor:
    """A per-group qparam broadcastable against ``_to_groups(x)``."""
    if p.dim() == x.dim():
        p = p.movedim(a, -1)
    return p.unsqueeze(-1)


def _bcast(p: torch.Tensor, x: torch.Tensor, spec: QuantizationSpec) -> torch.Tensor:
    """A per_tensor / per_channel / per_token qparam broadcastable against ``x``."""
    qs = spec.qscheme
    if qs == QSchemeType.per_tensor:
        if p.numel() != 1:
            raise ValueError(f"per_tensor quantization needs a single scale/zero_point, got shape "
                             f"{tuple(p.shape)}")
        return p.reshape(())
    if qs == QSchemeType.per_channel and p.dim() == 1 and x.dim() > 1:
        shape = [1] * x.dim()
        shape[_axis(spec, x.dim())] = p.shape[0]
        return p.reshape(shape)
    if qs == QSchemeType.per_token and p.dim() == x.dim() - 1:
        return p.unsqueeze(-1)
    return p


def minmax(x: torch.Tensor, spec: QuantizationSpec | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of ``x`` reduced to the qparam shape of ``spec`` (float32)."""
    spec = as_spec(spec)
    x = x.detach().to(torch.float32)
    qs = spec.qscheme
    if spec.is_cast or qs == QSchemeType.per_tensor:
        lo, hi = torch.aminmax(x)
        return lo, hi
    if qs == QSchemeType.per_token:
        return x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if qs == QSchemeType.per_channel:
        a = _axis(spec, x.dim())
        xt = x.movedim(a, 0).reshape(x.shape[a], -1)
        lo, hi = torch.aminmax(xt, dim=1)
        return lo, hi
    xg, a = _to_groups(x, spec)
    lo, hi = torch.aminmax(xg, dim=-1)
    return lo.movedim(-1, a), hi.movedim(-1, a)


# =========================================================================== qparams
def compute_qparams(min_val: torch.Tensor, max_val: torch.Tensor,
                    spec: QuantizationSpec | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) covering ``[min_val, max_val]`` (any shape, elementwise).

    The range is first widened to include 0. Integers: symmetric ``scale = amax / (2^(b-1)-1)``;
    asymmetric ``scale = (max - min) / (qmax - qmin)``, ``zero_point = qmin - round(min / scale)``
    (clamped into range). Float formats: ``scale = amax / fmt_max``. MX: the OCP shared scale
    ``2^(floor(log2 amax) - emax_elem)``. ``ScaleType.pof2`` rounds a scale *up* to a power of
    two (no clipping). bf16/fp16: scale 1, zero point 0.
    """
    spec = as_spec(spec)
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32, device=min_val.device)
    zeros = torch.zeros(torch.broadcast_shapes(min_val.shape, max_val.shape), dtype=torch.int32,
                        device=min_val.device)
    if spec.is_cast:
        return torch.ones_like(zeros, dtype=torch.float32), zeros
    lo = torch.clamp(min_val, max=0.0)
    hi = torch.clamp(max_val, min=0.0)
    amax = torch.maximum(-lo, hi)
    if spec.is_mx:
        return F.mx_block_scale(amax, F.mx_element_format(spec.mx_element_dtype)), zeros
    if spec.is_integer_format:
        qmin, qmax = spec.qmin, spec.qmax
        if spec.symmetric:
            scale = amax / ((qmax - qmin) / 2)
        else:
            scale = (hi - lo) / (qmax - qmin)
    else:
        scale = amax / F.float_format(spec.dtype).max_value
    scale = scale.clamp_min(SCALE_EPS)
    if spec.scale_type == ScaleType.pof2:
        scale = F.round_up_pow2(scale)
    if not spec.is_integer_format:
        return scale, zeros
    if spec.symmetric:
        zp = zeros + F.int_format(spec.dtype).symmetric_zero_point()
    else:
        zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zp


# =========================================================================== quantize / dequantize
def _uses_zero_point(spec: QuantizationSpec) -> bool:
    """Signed symmetric ints and float formats have zero point 0 by definition (ignored)."""
    return spec.is_integer_format and not (spec.symmetric and F.int_format(spec.dtype).signed)


def _codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
           spec: QuantizationSpec) -> torch.Tensor:
    """Quantized codes/values of ``x`` as float32 (exact integers or grid values)."""
    xf = x.to(torch.float32)
    scale = scale.to(torch.float32)
    grouped = spec.is_mx or spec.qscheme == QSchemeType.per_group
    if grouped:
        xg, a = _to_groups(xf, spec)
        v = xg / _group_param(scale, xf, a)
    else:
        v = xf / _bcast(scale, xf, spec)
    if spec.is_mx:
        q = F.round_to_element_format(v, F.mx_element_format(spec.mx_element_dtype), spec.round_method)
    elif spec.is_integer_format:
        q = F.round_fn(spec.round_method)(v)
        if _uses_zero_point(spec):
            zp = _group_param(zero_point, xf, a) if grouped else _bcast(zero_point, xf, spec)
            q = q + zp.to(torch.float32)
        q = q.clamp(spec.qmin, spec.qmax)
    else:
        q = F.round_to_float_format(v, F.float_format(spec.dtype), spec.round_method)
    return _from_groups(q, a, xf.shape[a]) if grouped else q


def _decode(qf: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
            spec: QuantizationSpec) -> torch.Tensor:
    """``(codes - zero_point) * scale`` in float32."""
    scale = scale.to(torch.float32)
    if spec.is_mx or spec.qscheme == QSchemeType.per_group:
        qg, a = _to_groups(qf, spec)
        if _uses_zero_point(spec):
            qg = qg - _group_param(zero_point, qf, a).to(torch.float32)
        return _from_groups(qg * _group_param(scale, qf, a), a, qf.shape[a])
    if _uses_zero_point(spec):
        qf = qf - _bcast(zero_point, qf, spec).to(torch.float32)
    return qf * _bcast(scale, qf, spec)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
             spec: QuantizationSpec | str) -> torch.Tensor:
    """Quantized codes / values of ``x`` in :func:`storage_dtype` (see the module docstring).

    ``zero_point`` is ignored where it is 0 by definition (signed symmetric ints, float formats,
    MX); pass any tensor, e.g. the one :func:`compute_qparams` returns.
    """
    spec = as_spec(spec)
    if spec.is_cast:
        return x.to(storage_dtype(spec))
    return _codes(x, scale, zero_point, spec).to(storage_dtype(spec))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               spec: QuantizationSpec | str, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32, returned as ``out_dtype``."""
    spec = as_spec(spec)
    if spec.is_cast:
        return q.to(out_dtype)
    return _decode(q.to(torch.float32), scale, zero_point, spec).to(out_dtype)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                  spec: QuantizationSpec | str) -> torch.Tensor:
    """``dequantize(quantize(x))`` computed in float32, returned in ``x.dtype`` (bit-identical to
    the composition; the codes stay in float32, which holds them exactly)."""
    spec = as_spec(spec)
    if spec.is_cast:
        return x.to(storage_dtype(spec)).to(x.dtype)
    return _decode(_codes(x, scale, zero_point, spec), scale, zero_point, spec).to(x.dtype)


# =========================================================================== dynamic
def dynamic_qparams(x: torch.Tensor, spec: QuantizationSpec | str) -> tuple[torch.Tensor, torch.Tensor]:
    """qparams of ``x`` computed from ``x`` itself (per_tensor, per_token, per_channel, per_group, MX)."""
    spec = as_spec(spec)
    lo, hi = minmax(x, spec)
    return compute_qparams(lo, hi, spec)


def dynamic_quantize(x: torch.Tensor, spec: QuantizationSpec | str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero_point) with qparams computed at run time (for kernels that need codes)."""
    spec = as_spec(spec)
    scale, zp = dynamic_qparams(x, spec)
    return quantize(x, scale, zp, spec), scale, zp


def dynamic_fake_quantize(x: torch.Tensor, spec: QuantizationSpec | str) -> torch.Tensor:
    """Fake-quantize ``x`` with qparams computed from ``x`` (dynamic activations)."""
    spec = as_spec(spec)
    if spec.is_cast:
        return fake_quantize(x, None, None, spec)
    scale, zp = dynamic_qparams(x, spec)
    return fake_quantize(x, scale, zp, spec)


# =========================================================================== weights
@dataclass
class QuantizedWeight:
    """A weight quantized offline: codes/values, their qparams, and the spec."""

    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: QuantizationSpec

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qdata, self.scale, self.zero_point, self.spec, out_dtype=dtype)

    @property
    def shape(self) -> torch.Size:
        return self.qdata.shape


def quantize_weight(w: torch.Tensor, spec: QuantizationSpec | str) -> QuantizedWeight:
    """Quantize a weight with min/max qparams of its own values (round-to-nearest).

    Raises ConfigError for a dynamic or per_token spec, or when an MX block size does not divide
    the block axis (the message names the shape; the caller adds the layer's name). A per_group
    ``group_size`` that does not divide ``in_features`` gives a shorter last group.
    """
    spec = as_spec(spec)
    if not spec.is_cast and (spec.is_dynamic or spec.qscheme == QSchemeType.per_token):
        raise ConfigError(f"weights are quantized once, offline: spec {spec.to_op_str()!r} is "
                          f"dynamic/per_token; use a static per_tensor/per_channel/per_group spec")
    lo, hi = minmax(w, spec)
    scale, zp = compute_qparams(lo, hi, spec)
    return QuantizedWeight(quantize(w, scale, zp, spec), scale, zp, spec)
