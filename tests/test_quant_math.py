"""Formats and fake-quant math: exact grids, rounding, qparams, shapes, custom ops."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from graphquant.config import Dtype, QuantizationSpec
from graphquant.errors import ConfigError
from graphquant.quant import formats as F
from graphquant.quant import ops  # noqa: F401  (registers torch.ops.graphquant.*)
from graphquant.quant.fake_quant import (compute_qparams, dequantize, dynamic_fake_quantize,
                                         dynamic_qparams, fake_quantize, minmax, qparam_shape,
                                         quantize, quantize_weight, storage_dtype)

SETTINGS = settings(max_examples=60, deadline=None)
# Ranges below ~1e-30 hit the scale floor (the smallest normal float32), by design.
floats32 = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32).map(
    lambda v: 0.0 if abs(v) < 1e-30 else v)
vectors = st.lists(floats32, min_size=2, max_size=48).map(lambda v: torch.tensor(v, dtype=torch.float32))


# --------------------------------------------------------------------------- independent grids
def enumerate_float_format(ebits: int, mbits: int, bias: int, nan_codes) -> list[float]:
    """All finite non-negative values of a sign/exponent/mantissa format, from its bit patterns
    (independent of graphquant.quant.formats). ``nan_codes(E, M)`` marks non-finite codes."""
    vals = set()
    for E in range(2 ** ebits):
        for M in range(2 ** mbits):
            if nan_codes(E, M):
                continue
            if E == 0:
                vals.add(M / 2 ** mbits * 2.0 ** (1 - bias))
            else:
                vals.add((1 + M / 2 ** mbits) * 2.0 ** (E - bias))
    return sorted(vals)


GRIDS = {
    "fp8_e4m3": enumerate_float_format(4, 3, 7, lambda E, M: E == 15 and M == 7),
    "fp8_e5m2": enumerate_float_format(5, 2, 15, lambda E, M: E == 31),
    "fp6_e3m2": enumerate_float_format(3, 2, 3, lambda E, M: False),
    "fp6_e2m3": enumerate_float_format(2, 3, 1, lambda E, M: False),
    "fp4": enumerate_float_format(2, 1, 1, lambda E, M: False),
}


def signed_grid(name) -> torch.Tensor:
    g = torch.tensor(GRIDS[name], dtype=torch.float64)
    return torch.cat([-g.flip(0), g[1:]])


def nearest_in(values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Distance from each value to the nearest grid point."""
    return (values.double()[:, None] - grid[None, :]).abs().min(dim=1).values


@pytest.mark.parametrize("name", list(GRIDS))
def test_format_max_matches_enumeration(name):
    assert F.float_format(name).max_value == GRIDS[name][-1]
    assert F.float_format(name).min_subnormal == GRIDS[name][1]


def test_fp4_values():
    assert GRIDS["fp4"] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("name,dt", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_grids_match_torch_dtypes(name, dt):
    allv = torch.arange(256, dtype=torch.uint8).view(dt).float()
    finite = allv[torch.isfinite(allv)]
    assert sorted(set(finite.abs().tolist())) == GRIDS[name]


@pytest.mark.parametrize("name", list(GRIDS))
def test_round_to_float_format_is_nearest_and_representable(name):
    fmt = F.float_format(name)
    g = signed_grid(name)
    v = torch.cat([torch.randn(4000) * fmt.max_value / 4, torch.rand(1000) * 4 * fmt.min_subnormal,
                   torch.tensor([0.0, -0.0, fmt.max_value, -fmt.max_value, 3 * fmt.max_value])])
    r = F.round_to_float_format(v, fmt)
    assert torch.all(nearest_in(r, g) == 0), "not representable"
    # nearest: no grid point strictly closer (saturation: beyond max the nearest is max)
    clipped = v.clamp(-fmt.max_value, fmt.max_value).double()
    assert torch.all((r.double() - clipped).abs() <= nearest_in(clipped, g))


@pytest.mark.parametrize("name", list(GRIDS))
def test_float_format_ties_round_half_even(name):
    """Midpoints between neighbours go to the neighbour with an even last mantissa bit."""
    fmt = F.float_format(name)
    grid = GRIDS[name]
    lo = torch.tensor(grid[:-1], dtype=torch.float64)
    hi = torch.tensor(grid[1:], dtype=torch.float64)
    mid = ((lo + hi) / 2).float()
    r = F.round_to_float_format(mid, fmt).double()

    def even(v):  # last mantissa bit of v's code is 0
        e = max(math.frexp(v)[1] - 1, fmt.emin) if v > 0 else fmt.emin
        return round(v / 2.0 ** (e - fmt.mbits)) % 2 == 0

    expected = torch.tensor([a if even(a) else b for a, b in zip(lo.tolist(), hi.tolist())],
                            dtype=torch.float64)
    assert torch.equal(r, expected)
    assert torch.equal(F.round_to_float_format(-mid, fmt).double(), -expected)


@pytest.mark.parametrize("dt,name", [(torch.float8_e4m3fn, "fp8_e4m3"), (torch.float8_e5m2, "fp8_e5m2")])
def test_fp8_rounding_agrees_with_torch_cast(dt, name):
    fmt = F.float_format(name)
    v = torch.randn(20000) * fmt.max_value / 8
    v = v.clamp(-fmt.max_value, fmt.max_value)
    assert torch.equal(F.round_to_float_format(v, fmt), v.to(dt).float())


def test_exact_pow2_helpers():
    e = torch.arange(-149, 128)
    p = F.exp2i(e)
    assert torch.equal(p.double(), torch.tensor([2.0 ** k for k in range(-149, 128)], dtype=torch.float64))
    assert torch.equal(F.floor_log2(p), e.to(torch.int32))
    below = torch.nextafter(p[1:], torch.zeros(()))  # just below each power of two
    assert torch.equal(F.floor_log2(below), e[1:].to(torch.int32) - 1)
    s = torch.tensor([1.0, 1.5, 3.0, 0.3, 2.0 ** -130, 1e30])
    up = F.round_up_pow2(s)
    assert torch.all(up >= s) and torch.all(up / 2 < s)
    assert torch.all(torch.frexp(up).mantissa == 0.5)


# --------------------------------------------------------------------------- rounding modes
@pytest.mark.parametrize("method,expected", [
    ("half_even", [-2, -2, -0, 0, 2, 2, 4, -4]),
    ("round", [-3, -2, -1, 1, 2, 3, 4, -4]),
    ("floor", [-3, -2, -1, 0, 1, 2, 3, -4]),
])
def test_int_rounding_ties(method, expected):
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, -3.5]) * 0.25
    spec = QuantizationSpec(Dtype.int8, round_method=method)
    q = quantize(x, torch.tensor(0.25), torch.tensor(0), spec)
    assert q.tolist() == expected


@settings(max_examples=200, deadline=None)
@given(v=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=20),
       halves=st.lists(st.integers(-2 ** 24, 2 ** 24), max_size=10),
       dt=st.sampled_from([torch.float32, torch.float64]))
def test_round_fns_match_reference(v, halves, dt):
    """The fast exact rounding equals torch.round / torch.floor and a Python half-away reference,
    on arbitrary floats, exact ties k + 1/2, and huge values."""
    x = torch.tensor(v + [h + 0.5 for h in halves] + [2.0 ** 22 + 0.5, -(2.0 ** 23) + 1, 2.0 ** 23, 3e38],
                     dtype=torch.float32).to(dt)
    assert torch.equal(F.round_fn("half_even")(x), torch.round(x))
    assert torch.equal(F.round_fn("floor")(x), torch.floor(x))
    ref = torch.tensor([math.copysign(math.floor(abs(a) + 0.5), a) if abs(a) % 1 == 0.5 else round(a)
                        for a in x.tolist()], dtype=dt)
    assert torch.equal(F.round_fn("round")(x), ref)


def test_round_half_away_exact_below_half():
    x = torch.tensor([0.49999997, -0.49999997, 2.5, -2.5, 1e8 + 0.0])
    assert F.round_half_away(x).tolist() == [0.0, -0.0, 3.0, -3.0, 1e8]


# --------------------------------------------------------------------------- integer formats
INT_SPECS = [QuantizationSpec(d, symmetric=s) for d in (Dtype.int8, Dtype.int4, Dtype.int2)
             for s in (True, False)] + [QuantizationSpec(d, symmetric=s) for d in (Dtype.uint8, Dtype.uint4)
                                        for s in (False, True)]


def test_int_ranges():
    assert (QuantizationSpec(Dtype.int8).qmin, QuantizationSpec(Dtype.int8).qmax) == (-127, 127)
    assert (QuantizationSpec(Dtype.int8, symmetric=False).qmin,) == (-128,)
    assert (QuantizationSpec(Dtype.int4).qmin, QuantizationSpec(Dtype.int4).qmax) == (-7, 7)
    assert (QuantizationSpec(Dtype.uint4).qmin, QuantizationSpec(Dtype.uint4).qmax) == (0, 15)
    assert (QuantizationSpec(Dtype.uint8, symmetric=True).qmin,) == (1,)
    assert (QuantizationSpec(Dtype.int2).qmin, QuantizationSpec(Dtype.int2).qmax) == (-1, 1)
    assert QuantizationSpec(Dtype.fp8_e4m3).qmin is None


@SETTINGS
@given(x=vectors, idx=st.integers(0, len(INT_SPECS) - 1))
def test_int_fake_quant_properties(x, idx):
    spec = INT_SPECS[idx]
    lo, hi = minmax(x, spec)
    scale, zp = compute_qparams(lo, hi, spec)
    q = quantize(x, scale, zp, spec)
    assert q.dtype == (torch.int8 if spec.dtype.value.startswith("int") else torch.uint8)
    assert spec.qmin <= int(q.min()) and int(q.max()) <= spec.qmax
    assert spec.qmin <= int(zp) <= spec.qmax
    fq = fake_quantize(x, scale, zp, spec)
    assert torch.equal(fq, dequantize(q, scale, zp, spec))
    assert torch.equal(fake_quantize(fq, scale, zp, spec), fq), "not idempotent"
    # error <= half a step everywhere inside the (0-widened) observed range
    tol = scale * 1e-5 + 1e-30
    assert torch.all((x - fq).abs() <= scale / 2 + tol)
    if not spec.symmetric and spec.is_integer_format:
        # asymmetric: the range ends are reached (to within half a step)
        ends = torch.stack([lo.clamp(max=0), hi.clamp(min=0)])
        assert torch.all((fake_quantize(ends, scale, zp, spec) - ends).abs() <= scale / 2 + tol)
    if spec.symmetric:
        assert int(zp) == F.int_format(spec.dtype).symmetric_zero_point()
        # +-amax map to the extreme codes
        amax = torch.maximum(-lo, hi)
        if amax > 0:
            assert int(quantize(amax, scale, zp, spec)) == spec.qmax
            assert int(quantize(-amax, scale, zp, spec)) == spec.qmin


@SETTINGS
@given(lo=st.floats(-1024, -2.0 ** -10, width=32), hi=st.floats(2.0 ** -10, 1024, width=32),
       dtype=st.sampled_from([Dtype.uint8, Dtype.uint4]))
def test_asymmetric_unsigned_zero_point_and_endpoints(lo, hi, dtype):
    spec = QuantizationSpec(dtype, symmetric=False)
    scale, zp = compute_qparams(torch.tensor(lo), torch.tensor(hi), spec)
    assert spec.qmin <= int(zp) <= spec.qmax
    ends = torch.tensor([lo, hi])
    q = quantize(ends, scale, zp, spec).to(torch.int32)
    # the extreme codes are reached, except a tie of round(min/scale) may shift them by one
    assert int(q[0]) in (spec.qmin, spec.qmin + 1) and int(q[1]) in (spec.qmax - 1, spec.qmax)
    assert int(q[0]) == spec.qmin or int(q[1]) == spec.qmax
    assert float(fake_quantize(torch.tensor(0.0), scale, zp, spec)) == 0.0  # zero exact


def test_asymmetric_endpoints_exact_codes_typical():
    torch.manual_seed(0)
    for dtype in (Dtype.uint8, Dtype.uint4):
        spec = QuantizationSpec(dtype, symmetric=False)
        for _ in range(200):
            x = torch.randn(64) * 3 + 0.5
            lo, hi = minmax(x, spec)
            scale, zp = compute_qparams(lo, hi, spec)
            q = quantize(x, scale, zp, spec)
            assert int(q.min()) == spec.qmin and int(q.max()) == spec.qmax


@SETTINGS
@given(x=vectors, dtype=st.sampled_from([Dtype.int8, Dtype.int4, Dtype.uint8, Dtype.fp8_e4m3, Dtype.fp4]))
def test_pof2_scales_are_powers_of_two(x, dtype):
    spec = QuantizationSpec(dtype, scale_type="pof2")
    scale, zp = dynamic_qparams(x, spec)
    assert float(torch.frexp(scale).mantissa) == 0.5
    float_scale, _ = dynamic_qparams(x, QuantizationSpec(dtype))
    assert float_scale <= scale < 2 * float_scale
    fq = fake_quantize(x, scale, zp, spec)
    assert torch.equal(fake_quantize(fq, scale, zp, spec), fq)


def test_zero_range_gives_positive_scale():
    for spec in INT_SPECS + [QuantizationSpec(Dtype.fp8_e4m3)]:
        scale, zp = compute_qparams(torch.tensor(0.0), torch.tensor(0.0), spec)
        assert float(scale) > 0
        assert torch.equal(fake_quantize(torch.zeros(3), scale, zp, spec), torch.zeros(3))


# --------------------------------------------------------------------------- float formats
FLOAT_DTYPES = [Dtype.fp8_e4m3, Dtype.fp8_e5m2, Dtype.fp6_e3m2, Dtype.fp6_e2m3, Dtype.fp4]


@SETTINGS
@given(x=vectors, dtype=st.sampled_from(FLOAT_DTYPES))
def test_float_fake_quant_representable_and_idempotent(x, dtype):
    spec = QuantizationSpec(dtype)
    scale, zp = dynamic_qparams(x, spec)
    q = quantize(x, scale, zp, spec)
    assert q.dtype == storage_dtype(spec)
    assert torch.all(nearest_in(q.float(), signed_grid(dtype.value)) == 0)
    fq = fake_quantize(x, scale, zp, spec)
    assert torch.equal(fq, dequantize(q, scale, zp, spec))
    assert torch.equal(fake_quantize(fq, scale, zp, spec), fq)
    assert torch.equal(torch.ops.graphquant.fake_quant(x, scale, zp, spec.to_op_str()), fq)


def test_fp8_quantize_returns_float8():
    x = torch.randn(16)
    for dtype, dt in ((Dtype.fp8_e4m3, torch.float8_e4m3fn), (Dtype.fp8_e5m2, torch.float8_e5m2)):
        spec = QuantizationSpec(dtype)
        scale, zp = dynamic_qparams(x, spec)
        q = quantize(x, scale, zp, spec)
        assert q.dtype == dt
        assert float(q.float().abs().max()) == F.float_format(dtype).max_value  # amax -> max
        assert torch.equal(dequantize(q, scale, zp, spec), q.float() * scale)


# --------------------------------------------------------------------------- MX
def mx_reference(x: torch.Tensor, elem: str) -> torch.Tensor:
    """Per-block Python reference of OCP MX v1.0 fake-quantization (blocks of 32, last dim)."""
    grid = signed_grid(elem).tolist() if elem != "int8" else [k / 64 for k in range(-128, 128)]
    emax = {"fp8_e4m3": 8, "fp8_e5m2": 15, "fp6_e3m2": 4, "fp6_e2m3": 2, "fp4": 2, "int8": 0}[elem]
    out = []
    for block in x.double().reshape(-1, 32).tolist():
        amax = max(abs(v) for v in block)
        e = (math.frexp(amax)[1] - 1 - emax) if amax > 0 else -127
        X = 2.0 ** max(min(e, 127), -127)
        for v in block:
            t = min(max(v / X, grid[0]), grid[-1])
            best = min(grid, key=lambda g: (abs(g - t), g))  # ties checked separately
            out.append(best * X)
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


@pytest.mark.parametrize("elem", ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4", "int8"])
def test_mx_matches_reference(elem):
    torch.manual_seed(1)
    x = torch.randn(3, 64) * torch.logspace(-3, 3, 64)
    x[2, :32] = 0.0  # an all-zero block
    spec = QuantizationSpec(Dtype.mx, mx_element_dtype=elem, is_dynamic=True)
    fq = dynamic_fake_quantize(x, spec)
    ref = mx_reference(x, elem)
    # ties between two grid points are measure-zero in random data: compare exactly
    assert torch.equal(fq.double(), ref)
    scale, _ = dynamic_qparams(x, spec)
    assert scale.shape == (3, 2)
    assert torch.all(torch.frexp(scale).mantissa == 0.5)
    e = F.floor_log2(scale)
    assert int(e.min()) >= -127 and int(e.max()) <= 127
    q = quantize(x, scale, torch.zeros_like(scale, dtype=torch.int32), spec)
    assert q.dtype == storage_dtype(spec)
    assert torch.equal(fake_quantize(fq, scale, torch.zeros_like(scale, dtype=torch.int32), spec), fq)


@SETTINGS
@given(x=st.lists(floats32, min_size=32, max_size=32).map(torch.tensor),
       elem=st.sampled_from(["fp8_e4m3", "fp6_e3m2", "fp6_e2m3", "fp4"]))
def test_mx_elements_representable(x, elem):
    spec = QuantizationSpec(Dtype.mx, mx_element_dtype=elem)
    scale, zp = dynamic_qparams(x, spec)
    q = quantize(x, scale, zp, spec).float()
    assert torch.all(nearest_in(q, signed_grid(elem)) == 0)
    assert torch.equal(q * scale, fake_quantize(x, scale, zp, spec))


# --------------------------------------------------------------------------- shapes
def test_qparam_shapes():
    w = torch.randn(6, 256)
    a = torch.randn(2, 5, 256)
    ch = QuantizationSpec(Dtype.int8, qscheme="per_channel")
    grp = QuantizationSpec(Dtype.uint4, qscheme="per_group", group_size=128)
    tok = QuantizationSpec(Dtype.int8, qscheme="per_token")
    mx = QuantizationSpec(Dtype.mx)
    qw = quantize_weight(w, ch)
    assert qw.scale.shape == (6,) and qw.qdata.shape == w.shape and qw.qdata.dtype == torch.int8
    qw = quantize_weight(w, grp)
    assert qw.scale.shape == (6, 2) and qw.zero_point.shape == (6, 2) and qw.qdata.dtype == torch.uint8
    assert dynamic_qparams(a, tok)[0].shape == (2, 5, 1)
    assert dynamic_qparams(a, grp)[0].shape == (2, 5, 2)
    assert dynamic_qparams(a, mx)[0].shape == (2, 5, 8)
    assert quantize_weight(w, mx).scale.shape == (6, 8)
    assert qparam_shape(a.shape, ch.evolve(ch_axis=-1)) == (256,)
    assert qparam_shape(w.shape, QuantizationSpec(Dtype.int8)) == ()


@SETTINGS
@given(rows=st.integers(1, 4), groups=st.integers(1, 4), g=st.sampled_from([2, 4, 8]),
       dtype=st.sampled_from([Dtype.int4, Dtype.uint4, Dtype.int8]))
def test_per_group_matches_per_tensor_on_each_group(rows, groups, g, dtype):
    """Per-group fake-quant equals per-tensor fake-quant applied to each group separately."""
    x = torch.randn(rows, groups * g)
    spec = QuantizationSpec(dtype, qscheme="per_group", group_size=g)
    qw = quantize_weight(x, spec)
    assert qw.scale.shape == (rows, groups)
    fq = qw.dequantize()
    pt = QuantizationSpec(dtype, symmetric=spec.symmetric)
    for r in range(rows):
        for j in range(groups):
            blk = x[r, j * g:(j + 1) * g]
            assert torch.equal(fq[r, j * g:(j + 1) * g], quantize_weight(blk, pt).dequantize())


def test_per_token_and_per_channel_match_rowwise():
    x = torch.randn(3, 4, 16)
    tok = QuantizationSpec(Dtype.int8, qscheme="per_token")
    fq = dynamic_fake_quantize(x, tok)
    pt = QuantizationSpec(Dtype.int8)
    for idx in [(0, 0), (1, 3), (2, 1)]:
        assert torch.equal(fq[idx], quantize_weight(x[idx], pt).dequantize())
    w = torch.randn(5, 7)
    ch = QuantizationSpec(Dtype.int8, qscheme="per_channel", ch_axis=1)
    fq = quantize_weight(w, ch).dequantize()
    for c in range(7):
        assert torch.equal(fq[:, c], quantize_weight(w[:, c], pt).dequantize())


def test_group_size_that_does_not_divide_gives_a_shorter_last_group():
    """compressed-tensors / vLLM convention: 300 columns in groups of 128 are 128 + 128 + 44."""
    spec = QuantizationSpec(Dtype.uint4, qscheme="per_group", group_size=128, symmetric=False)
    w = torch.randn(64, 300)
    w[:, 290] = 50.0  # an outlier in the short group must not leak into the full groups
    qw = quantize_weight(w, spec)
    assert qw.scale.shape == qw.zero_point.shape == (64, 3) and qw.qdata.shape == (64, 300)
    deq = qw.dequantize()
    for lo, hi in ((0, 128), (128, 256), (256, 300)):
        part = quantize_weight(w[:, lo:hi].contiguous(), spec)  # one group (hi - lo <= 128)
        assert torch.equal(deq[:, lo:hi], part.dequantize())
    assert (deq[:, :256] - w[:, :256]).abs().max() < 0.5  # full groups keep their own fine scale
    assert torch.equal(fake_quantize(w, qw.scale, qw.zero_point, spec), deq)


def test_mx_block_size_must_divide():
    spec = QuantizationSpec(Dtype.mx, mx_element_dtype="fp8_e4m3", group_size=32)
    with pytest.raises(ConfigError, match=r"\(4, 40\)"):
        quantize_weight(torch.randn(4, 40), spec)


def test_weight_spec_must_be_static():
    with pytest.raises(ConfigError, match="offline"):
        quantize_weight(torch.randn(4, 4), QuantizationSpec(Dtype.int8, qscheme="per_token"))


# --------------------------------------------------------------------------- casts and dtypes
def test_cast_specs():
    x = torch.randn(10, dtype=torch.float32)
    for dtype, dt in ((Dtype.bfloat16, torch.bfloat16), (Dtype.float16, torch.float16)):
        spec = QuantizationSpec(dtype)
        assert spec.to_op_str() == dtype.value
        assert torch.equal(dynamic_fake_quantize(x, spec), x.to(dt).float())
        assert torch.ops.graphquant.quantize(x, torch.ones(()), torch.zeros((), dtype=torch.int32),
                                             spec.to_op_str()).dtype == dt
        y = x.to(dt)
        out = torch.ops.graphquant.dynamic_fake_quant(y, spec.to_op_str())
        assert torch.equal(out, y) and out.data_ptr() != y.data_ptr()  # never aliases


def test_fake_quant_keeps_input_dtype():
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    for spec in (QuantizationSpec(Dtype.int8, qscheme="per_token"), QuantizationSpec(Dtype.mx, is_dynamic=True)):
        assert dynamic_fake_quantize(x, spec).dtype == torch.bfloat16
    spec = QuantizationSpec(Dtype.int8)
    scale, zp = dynamic_qparams(x, spec)
    q = torch.ops.graphquant.quantize(x, scale, zp, spec.to_op_str())
    assert q.dtype == torch.int8
    assert torch.ops.graphquant.dequantize(q, scale, zp, spec.to_op_str(), torch.bfloat16).dtype == torch.bfloat16
    assert torch.ops.graphquant.dequantize(q, scale, zp, spec.to_op_str()).dtype == torch.float32


# --------------------------------------------------------------------------- export and compile
class _QDQ(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 32)
        self.a_spec = QuantizationSpec(Dtype.int8).to_op_str()
        self.w_spec = QuantizationSpec(Dtype.int8, qscheme="per_channel").to_op_str()
        self.t_spec = QuantizationSpec(Dtype.int8, qscheme="per_token").to_op_str()
        self.mx_spec = QuantizationSpec(Dtype.mx, mx_element_dtype="fp4", is_dynamic=True).to_op_str()
        self.register_buffer("a_scale", torch.tensor(0.02))
        self.register_buffer("a_zp", torch.tensor(0, dtype=torch.int32))
        qw = quantize_weight(self.lin.weight.detach(), self.w_spec)
        self.register_buffer("w_q", qw.qdata)
        self.register_buffer("w_scale", qw.scale)
        self.register_buffer("w_zp", qw.zero_point)

    def forward(self, x):
        g = torch.ops.graphquant
        x = g.fake_quant(x, self.a_scale, self.a_zp, self.a_spec)
        q = g.quantize(x, self.a_scale, self.a_zp, self.a_spec)
        x = g.dequantize(q, self.a_scale, self.a_zp, self.a_spec, torch.float32)
        w = g.dequantize(self.w_q, self.w_scale, self.w_zp, self.w_spec, torch.float32)
        y = torch.nn.functional.linear(x, w, self.lin.bias)
        return g.dynamic_fake_quant(y, self.t_spec) + g.dynamic_fake_quant(y, self.mx_spec)


def test_ops_export_with_dynamic_batch_and_compile():
    m = _QDQ().eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        ref = m(x)
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        ep = torch.export.export(m, (x,), dynamic_shapes={"x": {0: batch, 1: seq}}, strict=False)
        targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert {"graphquant.fake_quant.default", "graphquant.quantize.default",
                "graphquant.dequantize.default", "graphquant.dynamic_fake_quant.default"} <= targets
        assert torch.equal(ep.module()(x), ref)
        x2 = torch.randn(3, 7, 64)
        assert torch.equal(ep.module()(x2), m(x2))
        compiled = torch.compile(m, backend="aot_eager", dynamic=True)
        assert torch.equal(compiled(x), ref)
        assert torch.equal(compiled(x2), m(x2))


def test_ops_fake_kernels_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 3, 64)
        s, z = torch.empty(()), torch.empty((), dtype=torch.int32)
        g = torch.ops.graphquant
        assert g.quantize(x, s, z, QuantizationSpec(Dtype.uint4, symmetric=False).to_op_str()).dtype == torch.uint8
        assert g.quantize(x, s, z, QuantizationSpec(Dtype.fp8_e5m2).to_op_str()).dtype == torch.float8_e5m2
        assert g.quantize(x, s, z, QuantizationSpec(Dtype.fp4).to_op_str()).dtype == torch.float32
        assert g.dequantize(x, s, z, "int8:per_tensor:sym:static:float:half_even", torch.float16).dtype == torch.float16
        assert g.dynamic_fake_quant(x.half(), "int8:per_token:sym:dynamic:float:half_even").dtype == torch.float16
