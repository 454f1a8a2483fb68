"""Number formats: integer ranges, low-precision float grids, MX block formats and rounding.

Everything here is exact: power-of-two arithmetic is done on float32 bit patterns, never with
``log2``/``exp2`` (whose last bit is implementation-defined), so a value this module calls
representable *is* representable.

Formats are keyed by the string value of :class:`graphquant.config.Dtype` (``"int8"``,
``"fp8_e4m3"``, ...); ``Dtype`` is a ``str`` enum, so either spelling works. This module
imports nothing from graphquant.

Integer ranges (``int_range``), as in the gq-llama-20m measurements ("int8 symmetric, levels
[-127, 127]"):

=====================  ===============================  ==================
signed, symmetric      ``[-(2^(b-1)-1), 2^(b-1)-1]``     zero point 0
signed, asymmetric     ``[-2^(b-1), 2^(b-1)-1]``         zero point in range
unsigned, asymmetric   ``[0, 2^b-1]``                    zero point in range
unsigned, symmetric    ``[1, 2^b-1]``                    zero point ``2^(b-1)``
=====================  ===============================  ==================

A symmetric range therefore always has ``2^b - 1`` levels centred on the zero point, so
``scale = amax / (2^(b-1) - 1)`` and ``-amax``/``+amax`` are both exactly reachable.

Float formats (sign, ``ebits`` exponent bits, ``mbits`` mantissa bits, ``bias``; subnormals;
no infinities used — conversion *saturates* to ``±max``):

===========  =====  =====  ====  =======  ================================================
name         ebits  mbits  bias  max      note
===========  =====  =====  ====  =======  ================================================
fp8_e4m3     4      3      7     448      OCP E4M3 / ``torch.float8_e4m3fn`` (no inf)
fp8_e5m2     5      2      15    57344    OCP E5M2 / ``torch.float8_e5m2`` (inf unused)
fp6_e3m2     3      2      3     28       OCP MX FP6 E3M2 (no inf/NaN)
fp6_e2m3     2      3      1     7.5      OCP MX FP6 E2M3 (no inf/NaN)
fp4          2      1      1     6        OCP MX FP4 E2M1: {0, .5, 1, 1.5, 2, 3, 4, 6}
===========  =====  =====  ====  =======  ================================================

MX block formats follow the OCP Microscaling Formats (MX) Specification v1.0 (Sept. 2023),
section 6.3: a block of ``k = 32`` elements shares one E8M0 scale
``X = 2^(floor(log2(amax)) - emax_elem)`` where ``emax_elem`` is the exponent of the element
format's largest normal number; elements are ``x / X`` rounded to the element format,
saturating at its max. E8M0 exponents span [-127, 127] (0xFF is NaN and never produced).
MXINT8 elements are 8-bit two's complement with 6 fraction bits: ``k / 64``, ``k`` in
[-128, 127], ``emax_elem = 0``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "IntFormat", "FloatFormat", "FixedPointFormat", "INT_FORMATS", "FLOAT_FORMATS", "CAST_DTYPES",
    "MX_ELEMENT_FORMATS", "E8M0_MIN_EXP", "E8M0_MAX_EXP", "int_range", "int_format", "float_format",
    "mx_element_format", "round_fn", "round_half_away", "floor_log2", "exp2i", "round_up_pow2",
    "round_to_float_format", "round_to_element_format", "mx_block_scale",
]


# --------------------------------------------------------------------------- integer formats
@dataclass(frozen=True)
class IntFormat:
    """A ``bits``-wide integer format; ``signed`` selects two's complement."""

    bits: int
    signed: bool

    def range(self, symmetric: bool) -> tuple[int, int]:
        """(qmin, qmax) of the clamp range; see the module table."""
        half = 1 << (self.bits - 1)
        if self.signed:
            return (-(half - 1), half - 1) if symmetric else (-half, half - 1)
        return (1, 2 * half - 1) if symmetric else (0, 2 * half - 1)

    def symmetric_zero_point(self) -> int:
        """Zero point of a symmetric range: 0 for signed, ``2^(b-1)`` for unsigned."""
        return 0 if self.signed else 1 << (self.bits - 1)

    @property
    def storage_dtype(self) -> torch.dtype:
        """Container of the quantized codes (int4/int2 are stored unpacked, one per byte)."""
        return torch.int8 if self.signed else torch.uint8


INT_FORMATS: dict[str, IntFormat] = {
    "int8": IntFormat(8, True), "uint8": IntFormat(8, False),
    "int4": IntFormat(4, True), "uint4": IntFormat(4, False),
    "int2": IntFormat(2, True),
}

#: Dtypes that are plain casts (no scale): name -> torch dtype.
CAST_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def int_format(name: str) -> IntFormat:
    return INT_FORMATS[_key(name)]


def int_range(name: str, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) for integer dtype ``name``; see the module table."""
    return int_format(name).range(symmetric)


# --------------------------------------------------------------------------- float formats
@dataclass(frozen=True)
class FloatFormat:
    """A sign-exponent-mantissa format with subnormals, saturating at ``max_value``."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max_value: float
    torch_dtype: torch.dtype | None = None  # a native torch container when one exists

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number (subnormals share it)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest normal number (``emax_elem`` of the MX spec)."""
        return _frexp_exponent(self.max_value) - 1

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mbits)

    @property
    def storage_dtype(self) -> torch.dtype:
        """fp8 formats live in torch's float8 dtypes; fp6/fp4 values are kept in float32."""
        return self.torch_dtype or torch.float32


@dataclass(frozen=True)
class FixedPointFormat:
    """Two's complement with ``fbits`` fraction bits (MXINT8 elements: ``k / 64``)."""

    name: str
    bits: int
    fbits: int

    @property
    def step(self) -> float:
        return 2.0 ** -self.fbits

    @property
    def min_value(self) -> float:
        return -(1 << (self.bits - 1)) * self.step

    @property
    def max_value(self) -> float:
        return ((1 << (self.bits - 1)) - 1) * self.step

    @property
    def emax(self) -> int:
        return _frexp_exponent(self.max_value) - 1

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.float32


FLOAT_FORMATS: dict[str, FloatFormat] = {
    "fp8_e4m3": FloatFormat("fp8_e4m3", 4, 3, 7, 448.0, torch.float8_e4m3fn),
    "fp8_e5m2": FloatFormat("fp8_e5m2", 5, 2, 15, 57344.0, torch.float8_e5m2),
    "fp6_e3m2": FloatFormat("fp6_e3m2", 3, 2, 3, 28.0),
    "fp6_e2m3": FloatFormat("fp6_e2m3", 2, 3, 1, 7.5),
    "fp4": FloatFormat("fp4", 2, 1, 1, 6.0),
}

#: Element formats of MX blocks (OCP MX v1.0 table 1), by ``mx_element_dtype`` name.
MX_ELEMENT_FORMATS: dict[str, FloatFormat | FixedPointFormat] = {
    **FLOAT_FORMATS, "int8": FixedPointFormat("int8", 8, 6),
}

#: E8M0 exponent range (0xFF, i.e. 128, is NaN).
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127


def float_format(name: str) -> FloatFormat:
    return FLOAT_FORMATS[_key(name)]


def mx_element_format(name: str) -> FloatFormat | FixedPointFormat:
    return MX_ELEMENT_FORMATS[_key(name)]


# --------------------------------------------------------------------------- rounding
def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (``RoundType.round``), exactly.

    ``floor(|x| + 0.5)`` is wrong for the float just below 0.5, so ties are detected exactly
    (``x - trunc(x)`` is exact in binary floating point) and the rest uses ``torch.round``.
    """
    t = torch.trunc(x)
    return torch.where((x - t).abs() == 0.5, t + torch.sign(x), torch.round(x))


_ROUND_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "half_even": torch.round,  # IEEE round-half-to-even
    "round": round_half_away,
    "floor": torch.floor,
}


def round_fn(method: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The rounding function of a ``RoundType`` value: ``half_even`` (IEEE ties-to-even,
    ``torch.round``), ``round`` (ties away from zero) or ``floor``."""
    return _ROUND_FNS[_key(method)]


# --------------------------------------------------------------------------- exact powers of two
def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """``floor(log2(a))`` as int32 for positive float32 ``a``, read from the bit pattern.

    Subnormals are handled; for ``a == 0`` the result is -150 (below every format's range).
    """
    a = a.to(torch.float32)
    sub = a < 2.0 ** -126
    a = torch.where(sub, a * 2.0 ** 64, a)  # exact: lifts subnormals into the normal range
    e = ((a.view(torch.int32) >> 23) & 0xFF) - 127
    e = torch.where(sub, e - 64, e)
    return torch.where(a == 0, torch.full_like(e, -150), e).to(torch.int32)


def exp2i(e: torch.Tensor) -> torch.Tensor:
    """Exactly ``2^e`` in float32 for integer ``e`` in [-149, 127] (clamped to that range)."""
    e = e.to(torch.int32).clamp(-149, 127)
    low = e < -126
    biased = torch.where(low, e + 64, e) + 127
    p = (biased << 23).view(torch.float32)
    return torch.where(low, p * 2.0 ** -64, p)  # exact: result is a float32 subnormal power of two


def round_up_pow2(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two ``>= s`` for positive float32 ``s`` (``ScaleType.pof2``)."""
    e = floor_log2(s)
    p = exp2i(e)
    return torch.where(p == s, p, exp2i(e + 1))


def _frexp_exponent(v: float) -> int:
    return math.frexp(v)[1]


# --------------------------------------------------------------------------- rounding to a grid
def round_to_float_format(v: torch.Tensor, fmt: FloatFormat, method: str = "half_even") -> torch.Tensor:
    """Round float32 ``v`` onto the grid of ``fmt`` by ``method`` (``half_even``: nearest, ties to
    the even mantissa; ``round``: nearest, ties away from zero; ``floor``: toward -inf),
    saturating at ``±max_value``.

    The result is float32 holding exactly representable values of ``fmt``. Within the binade of
    ``|v|`` the grid step is ``2^(e - mbits)`` with ``e = max(floor(log2|v|), emin)``; rounding
    ``v / step`` to an integer and multiplying back is exact. Rounding up at the top of a binade
    lands on ``2^(e+1)``, itself representable.
    """
    v = v.to(torch.float32)
    v = v.clamp(-fmt.max_value, fmt.max_value)
    e = floor_log2(v.abs()).clamp_min(fmt.emin)
    step = exp2i(e - fmt.mbits)
    q = round_fn(method)(v / step) * step
    return q.clamp(-fmt.max_value, fmt.max_value)


def round_to_element_format(v: torch.Tensor, fmt: FloatFormat | FixedPointFormat,
                            method: str = "half_even") -> torch.Tensor:
    """Round to an MX element format (float or fixed point), saturating; float32 result."""
    if isinstance(fmt, FixedPointFormat):
        q = round_fn(method)(v.to(torch.float32) / fmt.step) * fmt.step
        return q.clamp(fmt.min_value, fmt.max_value)
    return round_to_float_format(v, fmt, method)


def mx_block_scale(amax: torch.Tensor, fmt: FloatFormat | FixedPointFormat) -> torch.Tensor:
    """OCP MX v1.0 shared scale ``2^(floor(log2(amax)) - emax_elem)``, as float32.

    The exponent is clamped to the E8M0 range [-127, 127]; an all-zero block gets ``2^-127``.
    """
    amax = amax.to(torch.float32)
    e = floor_log2(amax) - fmt.emax
    e = torch.where(amax > 0, e, torch.full_like(e, E8M0_MIN_EXP))
    return exp2i(e.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP))


def _key(name) -> str:
    return getattr(name, "value", name)
