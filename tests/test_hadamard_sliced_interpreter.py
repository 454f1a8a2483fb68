"""The persistent Hadamard kernel with column slices and row blocks (``hadamard_triton._persistent_sliced_kernel``:
``H_N = H_2 ⊗ H_{N/2}``, the ``H_2`` part as one fp32 butterfly across the two column halves of the row view)
in Triton's CPU interpreter (a subprocess), at Llama-3-8B's 14336 = 112 x 128 (QuaRot's R4 at prefill).

- Integer data: every partial sum is exact in fp32 however the sums are grouped, so each sliced variant must give
  the unsliced kernel's transform bit for bit, and its codes (static and dynamic scale, int8 and fp8) and scales
  too.
- Random fp16 data: the intermediates' two bf16 pieces now hold other sums (16 significant bits each way), so a
  few outputs round the other way; the error against the float64 transform must stay within one unit of the last
  place and within a tenth of one of the unsliced kernel's, and the fused codes equal ``quantize_rows`` of the
  same kernel's transform."""
from __future__ import annotations

from conftest import run_in_triton_interpreter

_CHECK = r"""
import dataclasses, math
import torch
from graphquant import hadamard as H
from graphquant.kernels import hadamard_triton as HT
from graphquant.kernels import quant_triton as QT
n = 14336
base = dataclasses.replace(HT.plan(n, 2), persistent=True, ctas=1, col_split=1, row_split=1)
variants = [dataclasses.replace(base, col_split=c, row_split=r) for c, r in ((2, 1), (2, 2), (1, 2))]
torch.manual_seed(0)
xi = torch.randint(-8, 9, (3, n)).to(torch.float16)
want = HT.hadamard_transform_triton(xi, plan_override=base)
coded = {}
for fp8 in (False, True):
    for static in (False, True):
        s = torch.tensor(0.5) if static else None
        coded[fp8, static] = HT.hadamard_quantize(xi, fp8, s, plan_override=base)
checked = 0
for p in variants:
    assert torch.equal(HT.hadamard_transform_triton(xi, plan_override=p), want), p.describe()
    for (fp8, static), (wq, ws) in coded.items():
        q, sc = HT.hadamard_quantize(xi, fp8, torch.tensor(0.5) if static else None, plan_override=p)
        assert torch.equal(q.view(torch.int8), wq.view(torch.int8)), (p.describe(), fp8, static)
        assert static or torch.equal(sc, ws), (p.describe(), fp8)
        checked += 1
x = (torch.randn(2, n) * 3).to(torch.float16)
ref = x.double() @ H.hadamard_matrix(n, dtype=torch.float64).T
ulp = torch.finfo(torch.float16).eps * torch.maximum(ref.abs(), ref.pow(2).mean().sqrt() / 16)
err = lambda y: float(((y.double() - ref).abs() / ulp).max())
limit = min(1.0, err(HT.hadamard_transform_triton(x, plan_override=base)) + 0.1)
for p in variants:
    y = HT.hadamard_transform_triton(x, plan_override=p)
    assert err(y) <= limit, (p.describe(), err(y), limit)
    for fp8 in (False, True):
        wq, ws = QT.quantize_rows(y, fp8)
        q, sc = HT.hadamard_quantize(x, fp8, None, plan_override=p)
        assert torch.equal(q.view(torch.int8), wq.view(torch.int8)) and torch.equal(sc, ws), (p.describe(), fp8)
        checked += 1
print("checked", checked)
"""


def test_sliced_persistent_kernel_matches_the_unsliced_one():
    """12 integer cases (3 variants x int8 / fp8 x static / dynamic) and 6 random ones (3 x int8 / fp8)."""
    assert "checked 18" in run_in_triton_interpreter(_CHECK)
