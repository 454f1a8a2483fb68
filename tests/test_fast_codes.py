"""``quant_triton.codes``' ``FAST`` sequence gives fake-quant's codes, bit for bit.

Its quotient (``_div_rn_by``: ``r = RN(1/s)``, ``q0 = RN(x·r)``, two FMA residual corrections) is replayed here in
exact rational arithmetic, every operation rounded to fp32 as the GPU rounds it (``mul.rn``, ``fma.rn``, no flush
to zero), on quotients next to every place a code changes: half-integers (int8), midpoints of the fp8 e4m3 grid,
the clamp, subnormal quotients, and random ones, under scales spanning 40 binades. The GPU test compares the
kernels with ``FAST_CODES`` on and off on the same inputs, infinities and NaN included.
"""
from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

FP8_MAX, INT8_MAX = 448.0, 127.0


def rn32(v: Fraction) -> Fraction:
    """``v`` rounded to the nearest fp32 value, ties to even (subnormals kept; beyond the largest finite -> inf)."""
    if v == 0:
        return Fraction(0)
    sign = -1 if v < 0 else 1
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()  # 2^e <= a < 2^(e+2)
    if Fraction(2) ** e > a:
        e -= 1
    elif Fraction(2) ** (e + 1) <= a:
        e += 1
    quantum = Fraction(2) ** (max(e, -126) - 23)
    m = a / quantum
    n = m.numerator // m.denominator
    rest = m - n
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and n % 2):
        n += 1
    out = n * quantum
    if out >= Fraction(2) ** 128:
        return Fraction(sign * 10 ** 60)  # stands for inf: every test below treats it as "beyond the limit"
    return sign * out


def f32(x: float) -> Fraction:
    return rn32(Fraction(x))


def fast_quotient(x: Fraction, s: Fraction, limit: float) -> Fraction:
    """``_div_rn_by``, operation by operation."""
    r = rn32(1 / s)
    q0 = rn32(x * r)
    q = rn32(rn32(x - q0 * s) * r + q0)
    q = rn32(rn32(x - q * s) * r + q)
    return q if abs(q) <= limit and q != 0 else q0


def e4m3_midpoints():
    """Every midpoint between neighbouring non-negative fp8 e4m3 values up to 448 (where fp8 codes change)."""
    grid = sorted({float(v) for v in torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()})
    return [Fraction(a) / 2 + Fraction(b) / 2 for a, b in zip(grid, grid[1:])]


def ulps_around(v: Fraction, k: int):
    """fp32 values within ``k`` ulps of ``rn32(v)``."""
    base = rn32(v)
    if base == 0:
        return [base]
    e = math.floor(math.log2(abs(float(base))))
    step = Fraction(2) ** (max(e, -126) - 23)
    return [base + i * step for i in range(-k, k + 1)]


def test_fast_quotient_is_the_correctly_rounded_one_everywhere_a_code_can_change():
    rng = random.Random(0)
    scales = [f32(rng.uniform(1, 2) * 2.0 ** rng.randint(-30, 10)) for _ in range(24)] + [Fraction(1), f32(1 / 3)]
    targets = [Fraction(2 * k + 1, 2) for k in range(-128, 128)]  # int8 rounding boundaries
    mids = e4m3_midpoints()
    targets += mids + [-m for m in mids]
    targets += [Fraction(v) for v in (127, 127.5, 448, 464, 480, 896, 1e-3, 2.0 ** -10, 2.0 ** -9 * 3)]
    checked = 0
    for s in scales:
        for t in rng.sample(targets, 120) + [Fraction(rng.uniform(-600, 600)) for _ in range(40)]:
            for x in ulps_around(s * t, 2):
                exact = rn32(x / s)
                got = fast_quotient(x, s, 2 * FP8_MAX)
                if abs(exact) <= 2 * FP8_MAX:
                    assert got == exact, (float(x), float(s), float(got), float(exact))
                else:  # both clamp to the same code
                    assert abs(got) > FP8_MAX and (got > 0) == (exact > 0), (float(x), float(s))
                checked += 1
    # quotients in the subnormal range and scales whose reciprocal is subnormal or near overflow
    for s in (f32(2.0 ** 100 * 1.37), f32(2.0 ** -100 * 1.91)):
        for x in (f32(2.0 ** -140), f32(-(2.0 ** -120) * 1.5), f32(3.0), f32(2.0 ** 90 * 1.2)):
            exact = rn32(x / s)
            got = fast_quotient(x, s, 2 * INT8_MAX)
            if abs(exact) <= 2 * INT8_MAX:
                assert got == exact, (float(x), float(s))
            else:
                assert abs(got) > INT8_MAX and (got > 0) == (exact > 0)
            checked += 1
    assert checked > 20000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_codes_equal_the_exact_sequence_on_the_gpu(monkeypatch):
    """``FAST_CODES`` on and off: the same codes and scales from ``quantize_rows`` (static, dynamic, split) and
    ``hadamard_quantize`` (few rows, persistent), on values next to every rounding boundary, inf and NaN."""
    from graphquant.kernels import hadamard_triton as HT
    from graphquant.kernels import quant_triton as QT

    g = torch.Generator(device="cuda").manual_seed(0)
    scale = torch.tensor(0.0123, device="cuda")
    boundaries = torch.cat([torch.arange(-128, 128, device="cuda") + 0.5,
                            torch.tensor([float(m) for m in e4m3_midpoints()], device="cuda")])
    near = (boundaries[:, None] * scale).float() * (1 + torch.arange(-4, 5, device="cuda") * 2.0 ** -24)
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e30, -1e-30, 0.0, -0.0], device="cuda")
    x = torch.cat([special, near.flatten(), -near.flatten(), torch.randn(200_000, device="cuda", generator=g) * 3])
    x = x[: x.numel() // 4096 * 4096].reshape(-1, 4096)  # the special values sit in row 0
    h = torch.randn(20, 14336, device="cuda", generator=g, dtype=torch.bfloat16)  # the same input for both runs
    runs = {}
    for fast in (False, True):
        monkeypatch.setattr(QT, "FAST_CODES", fast)
        out = []
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            for fp8 in (False, True):
                out.append(QT.quantize_rows(xd, fp8, static_scale=scale.reshape(1))[0])
                out += list(QT.quantize_rows(xd, fp8))
                out += list(QT.quantize_rows(xd[:2, :].repeat(1, 4)[:, :14336], fp8, split=True))
        for rows in (1, 16, 20):
            for fp8 in (False, True):
                out.append(HT.hadamard_quantize(h[:rows], fp8, static_scale=scale)[0])
                if HT.fusable(14336, torch.bfloat16, rows):
                    out += list(HT.hadamard_quantize(h[:rows], fp8))
        runs[fast] = out
    assert len(runs[False]) == len(runs[True])
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
    for i, (a, b) in enumerate(zip(runs[False], runs[True])):  # bit for bit (NaN scales included)
        assert a.dtype == b.dtype and a.shape == b.shape
        ia, ib = a.view(bits[a.element_size()]), b.view(bits[b.element_size()])
        where = (ia != ib).nonzero()[:5].tolist()
        assert not where, f"output {i} ({a.dtype}): exact {[ia[tuple(w)].item() for w in where]} " \
                          f"vs FAST {[ib[tuple(w)].item() for w in where]} at {where}"
