"""Static-scale codes through a verified multiplier (``quant_triton.multiplier_check_kernel``,
``static_multiplier``, ``codes_by``; ``hadamard_triton.STATIC_MULTIPLIER``), in Triton's CPU interpreter (a
subprocess).

- The check launch's flags equal a torch replay of its rule: bit ``k`` set where some finite 16-bit input's code
  under candidate ``k`` (``RN(1/s)``, then its lower and upper fp32 neighbours) differs from the code of the
  correctly rounded ``y / s``.
- QuaRot's R4 at prefill (the persistent kernels: 4096's plan, and 14336's sliced plan) with a static scale
  gives the codes of ``quantize_rows`` applied to the same plan's transform, bit for bit, for int8 and fp8,
  bf16 and fp16 rows; also where the check is made to pass no candidate (the exact kernel then rewrites every
  row the multiplier kernel left as zeros)."""
from __future__ import annotations

from conftest import run_in_triton_interpreter

_FLAGS = r"""
import torch
from graphquant.kernels import quant_triton as QT
bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
def code(v, fp8):
    if fp8:
        return v.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.int8)
    return torch.round(v).clamp(-127, 127).to(torch.int8)
seen = set()
checked = 0
for dtype in (torch.bfloat16, torch.float16):
    y = bits.view(dtype).float()
    finite = torch.isfinite(y)
    for fp8 in (True, False):
        for sv in (0.05, 0.0123, 3.7e-3, 1.0, 2.0 ** -20):
            s = torch.tensor([sv], dtype=torch.float32)
            flags = QT.multiplier_flags(s, fp8, dtype)
            got = 0
            for f in flags.tolist():
                got |= f
            exact = code(y / s, fp8)
            r0 = 1.0 / s
            want = 0
            cands = (r0, torch.nextafter(r0, torch.zeros(1)), torch.nextafter(r0, torch.full((1,), 1e30)))
            for k, r in enumerate(cands):
                want |= int(bool((finite & (code(y * r, fp8) != exact)).any())) << k
            assert got == want, (dtype, fp8, sv, got, want)
            seen.add(got)
            checked += 1
assert QT.multiplier_flags(torch.tensor([0.5]), True, torch.float32) is None
assert 0 in seen and len(seen) > 1, seen  # some scales pass every candidate, some fail one
print("checked", checked)
"""

_CODES = r"""
import dataclasses
import torch
from graphquant.kernels import hadamard_triton as HT
from graphquant.kernels import quant_triton as QT
torch.manual_seed(0)
plans = [(4096, dataclasses.replace(HT.plan(4096, 2), ctas=1)),
         (14336, dataclasses.replace(HT.plan(14336, 2), ctas=1))]
assert plans[1][1].col_split == 2 and plans[1][1].row_split == 2
real_flags = QT.multiplier_flags
checked = 0
for n, p in plans:
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(2, n) * 3).to(dtype)
        y = HT.hadamard_transform_triton(x, plan_override=p)
        for fp8 in (False, True):
            for sv, none_pass in ((0.05, False), (0.0123, False), (0.05, True)):
                s = torch.tensor(sv)
                HT.multiplier_flags = (lambda *a: torch.full((QT.MUL_CHECKS.value,), 7, dtype=torch.int32)) \
                    if none_pass else real_flags
                try:
                    q, _ = HT.hadamard_quantize(x, fp8, s, plan_override=p)
                finally:
                    HT.multiplier_flags = real_flags
                want, _ = QT.quantize_rows(y, fp8, s)
                assert torch.equal(q.view(torch.int8), want.view(torch.int8)), (n, dtype, fp8, sv, none_pass)
                assert int((want.view(torch.int8) != 0).sum()) > n // 2  # codes, not zeros
                checked += 1
print("checked", checked)
"""


def test_check_launch_flags_follow_its_rule():
    """20 cases: bf16 / fp16 x fp8 / int8 x five scales."""
    assert "checked 20" in run_in_triton_interpreter(_FLAGS)


def test_r4_prefill_codes_through_the_multiplier_equal_the_exact_codes():
    """24 cases: two plans x fp16 / bf16 x int8 / fp8 x (two scales + one with no candidate passing)."""
    assert "checked 24" in run_in_triton_interpreter(_CODES)
