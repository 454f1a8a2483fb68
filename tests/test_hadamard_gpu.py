"""The Triton Hadamard kernels against the float64 dense reference (CUDA only)."""
from __future__ import annotations

import pytest
import torch

from graphquant import hadamard as H

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SIZES = [64, 128, 4096, 14336, 18944, 172 * 64]


@pytest.fixture(scope="module")
def ht():
    return pytest.importorskip("graphquant.kernels.hadamard_triton", exc_type=ImportError)


def _reference(x: torch.Tensor, n: int, transpose: bool) -> torch.Tensor:
    h = H.hadamard_matrix(n, dtype=torch.float64, device=x.device)
    return x.double() @ (h if transpose else h.T)


def _assert_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    if y.dtype == torch.float32:
        err = (y.double() - ref).abs().max().item()
        assert err <= 2e-6 * ref.abs().max().item(), err
    else:  # fp32-exact stages and one final rounding: within one unit in the last place (floored
        # at the ulp of rms/16, below which fp32 accumulation error is visible in relative terms)
        floor = ref.pow(2).mean().sqrt() / 16
        ulp = torch.finfo(y.dtype).eps * torch.maximum(ref.abs(), floor)
        bad = (y.double() - ref).abs() > ulp
        assert not bad.any(), f"{int(bad.sum())} elements off by more than one ulp"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_float64_reference(ht, n, dtype):
    torch.manual_seed(n)
    x = (torch.randn(257, n, device="cuda") * 3).to(dtype)
    assert ht.supports(x)
    for transpose in (False, True):
        y = ht.hadamard_transform_triton(x, transpose=transpose)
        assert y.shape == x.shape and y.dtype == dtype
        _assert_close(y, _reference(x, n, transpose))


@pytest.mark.parametrize("n", [12, 172, 4096, 28 * 64])
def test_triton_fp16_and_leading_dims(ht, n):
    x = torch.randn(2, 3, 33, n, device="cuda").to(torch.float16)
    y = ht.hadamard_transform_triton(x)
    _assert_close(y.reshape(-1, n), _reference(x.reshape(-1, n), n, False))


@pytest.mark.parametrize("n", [128, 14336])
def test_op_dispatches_to_triton_on_cuda(ht, n):
    x = torch.randn(64, n, device="cuda", dtype=torch.bfloat16)
    y = torch.ops.graphquant.hadamard_transform(x, False)
    assert torch.equal(y, ht.hadamard_transform_triton(x))
    fallback = H.hadamard_transform(x).float()  # the torch path on the GPU agrees to a rounding
    tol = 2 ** -7 * (fallback.abs() + fallback.pow(2).mean().sqrt() / 16)
    assert ((y.float() - fallback).abs() <= tol).all()


@pytest.mark.parametrize("n", [128, 4096, 14336])
def test_persistent_and_tiled_kernels_agree(ht, n):
    import dataclasses

    x = torch.randn(300, n, device="cuda", dtype=torch.bfloat16)
    p = ht.plan(n)
    ref = _reference(x, n, False)
    for variant in (dataclasses.replace(p, persistent=True), dataclasses.replace(p, persistent=False)):
        _assert_close(ht.hadamard_transform_triton(x, plan_override=variant), ref)


@pytest.mark.parametrize("n", [4096, 14336, 172 * 64])
@pytest.mark.parametrize("rows", [1, 16, 17])
def test_few_rows_take_the_row_splitting_plan_and_stay_exact(ht, n, rows):
    """Up to FEW_ROWS rows (decode) run the tiled twin of the plan, one row over several programs."""
    x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    y = ht.hadamard_transform_triton(x)
    _assert_close(y, _reference(x, n, False))
    p = ht.plan(n)
    few = ht.few_rows_plan(p)
    if rows <= ht.FEW_ROWS and p.kind == "factored":
        assert not few.persistent and few.BM == 16
        assert torch.equal(y, ht.hadamard_transform_triton(x, plan_override=few))
    else:
        assert torch.equal(y, ht.hadamard_transform_triton(x, plan_override=p))


def test_op_float64_uses_torch_fallback():
    x = torch.randn(4, 28, device="cuda", dtype=torch.float64)
    y = torch.ops.graphquant.hadamard_transform(x, True)
    assert torch.allclose(y, _reference(x, 28, True), atol=1e-12)


def test_static_codes_through_the_multiplier_equal_the_exact_codes(ht, monkeypatch):
    """QuaRot's R4 at prefill with a static scale (the persistent kernels, ``STATIC_MULTIPLIER``): for 40 random
    scales, int8 and fp8, bf16 and fp16 rows at 4096 and 14336 (the sliced plan), the codes of ``quantize_rows``
    on the same transform bit for bit (which candidate the check picked is counted: every scale found one here);
    also where the check is made to pass none (the exact kernel then writes the codes)."""
    from graphquant.kernels import quant_triton as QT

    g = torch.Generator(device="cuda").manual_seed(0)
    scales = torch.exp(torch.empty(40).uniform_(-9, 2, generator=torch.Generator().manual_seed(1)))
    picked = {0: 0, 1: 0, 2: 0, None: 0}
    for n in (4096, 14336):
        for dtype in (torch.bfloat16, torch.float16):
            x = (torch.randn(300, n, device="cuda", generator=g) * 2).to(dtype)
            y = ht.hadamard_transform_triton(x)
            for i, sv in enumerate(scales.tolist()):
                fp8 = i % 2 == 0
                s = torch.tensor(sv, device="cuda")
                flags = QT.multiplier_flags(s.reshape(1), fp8, dtype)
                acc = 0
                for f in flags.tolist():
                    acc |= f
                picked[next((k for k in range(3) if not acc >> k & 1), None)] += 1
                q, _ = ht.hadamard_quantize(x, fp8, s)
                want, _ = QT.quantize_rows(y, fp8, s)
                assert torch.equal(q.view(torch.int8), want.view(torch.int8)), (n, dtype, sv, fp8, acc)
            monkeypatch.setattr(ht, "multiplier_flags", lambda *a: torch.full((64,), 7, dtype=torch.int32,
                                                                                device="cuda"))
            for fp8 in (False, True):
                s = torch.tensor(0.05, device="cuda")
                q, _ = ht.hadamard_quantize(x, fp8, s)
                want, _ = QT.quantize_rows(y, fp8, s)
                assert torch.equal(q.view(torch.int8), want.view(torch.int8)), (n, dtype, fp8, "no multiplier")
            monkeypatch.undo()
    assert picked[None] == 0 and sum(picked.values()) == 160, picked
