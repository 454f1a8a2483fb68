"""The few-rows (decode) Hadamard + activation-quantization kernel (``hadamard_triton.hadamard_quantize``, the
tiled transform with its quantization epilogue) in Triton's CPU interpreter (a subprocess): a static scale per
tile, a dynamic per-row scale from the tiles' maxima by a second launch (a workspace). Codes and scales must
equal the transform followed by ``quant_triton.quantize_rows``, for 1 and 3 rows, int8 and fp8, launch after
launch. The GPU test
(``tests/test_decode_kernels_gpu.py``) checks the same against fake-quant on the H200, CUDA graphs included."""
from __future__ import annotations

from conftest import run_in_triton_interpreter

_CHECK = r"""
import torch
from graphquant.kernels import hadamard_triton as HT
from graphquant.kernels import quant_triton as QT
torch.manual_seed(0)
checked = 0
for n in (4096, 172 * 64):  # 64|64 (one Sylvester stage); 172|64, whose row fits no persistent kernel
    for rows in (1, 3):
        # fp16 (the interpreter's bf16 dots are not exact): two bf16 pieces per element, exact to fp32
        x = (torch.randn(rows, n) * 3).to(torch.float16)
        y = HT.hadamard_transform_triton(x)
        for fp8 in (False, True):
            for static in (False, True):
                s = torch.tensor(0.05) if static else None
                assert HT.fusable(n, x.dtype, rows)
                want_q, want_s = QT.quantize_rows(y, fp8, s)
                for _ in range(2):
                    q, sc = HT.hadamard_quantize(x, fp8, s)
                    assert torch.equal(q.view(torch.int8), want_q.view(torch.int8)), (n, rows, fp8, static)
                    assert (sc is None) == static
                    assert static or torch.equal(sc, want_s), (n, rows, fp8, (sc - want_s).abs().max())
                    checked += 1
print("checked", checked)
"""


def test_few_rows_epilogue_gives_the_two_ops_codes():
    assert "checked 32" in run_in_triton_interpreter(_CHECK)


def test_fusable_is_asked_inside_a_compiled_graph():
    """The lowered graphs ask ``fusable`` while Dynamo traces them (``activation._fused_under_compile``): for an
    order outside the measured plans (1152, gq-llama-20m's intermediate size) its plan search must not break
    a ``fullgraph`` compile (it did on the GPU: ``min`` with a key is not traceable)."""
    import torch

    from graphquant.kernels import hadamard_triton as HT

    HT.plan.cache_clear()
    f = torch.compile(lambda t: t + int(HT.fusable(1152, torch.bfloat16, 1))
                      + 2 * int(HT.fusable(11008, torch.bfloat16, 4096)), fullgraph=True, backend="eager")
    assert f(torch.zeros(2)).tolist() == [1.0, 1.0]  # 36 x 32 at one row; 11008's row fits no persistent kernel


_ONE_STEP = r"""
import torch
from graphquant.kernels import hadamard_triton as HT
torch.manual_seed(1)
# 172|64: stage 1 in steps of 32 rows, or of 128. Integer values: every partial sum is exact in fp32 whatever the
# order in which the steps add up, so the two must agree bit for bit (on the GPU, bf16 data, they also do for random
# values: the tensor cores take the K steps in the same order, benchmarks/r4_decode_gpu.py)
x = torch.randint(-8, 9, (2, 172 * 64)).to(torch.float16)
out = {}
for bk in (None, 128):
    HT.FEW_ROWS_BK = bk
    assert HT.few_rows_plan(HT.plan(x.shape[1], 2)).BK == (bk or 32)
    out[bk] = (HT.hadamard_transform_triton(x), HT.hadamard_quantize(x, True, torch.tensor(0.05))[0])
assert torch.equal(out[None][0], out[128][0])
assert torch.equal(out[None][1].view(torch.int8), out[128][1].view(torch.int8))
print("same")
"""


def test_few_rows_stage_one_in_one_step_gives_the_same_bits():
    """``FEW_ROWS_BK``: the decode kernel's stage 1 over 128 rows of the row view per step (two steps for 172 rows,
    the last zero-padded and masked) computes the transform and its codes as the plan's 32-row steps do."""
    assert "same" in run_in_triton_interpreter(_ONE_STEP)


def test_few_rows_plan_takes_the_row_view_in_as_few_steps_as_the_tile_allows():
    from graphquant.kernels import hadamard_triton as HT

    p = HT.few_rows_plan(HT.plan(14336, 2))  # Llama-3-8B's intermediate: 112|128 in one step
    assert (p.BM, p.BK, p.NKC, p.persistent) == (16, 128, 1, False)
    for n in (1152, 1536, 4096, 11008, 18944, 28672, 8192):
        plan = HT.plan(n, 2)
        q = HT.few_rows_plan(plan)
        assert q.BK >= plan.BK and q.BK * q.D1 * q.D2 <= max(HT.TILE_MAX, plan.BK * plan.D1 * plan.D2), n
        assert q.BK & (q.BK - 1) == 0 and (q.NKC == 1 or q.BK == HT.FEW_ROWS_BK
                                           or 2 * q.BK * q.D1 * q.D2 > HT.TILE_MAX), n


_LOADED = r"""
import torch
from graphquant import hadamard as H
from graphquant.kernels import hadamard_triton as HT
out = {}
for loaded in (False, True):
    HT.SYLVESTER_LOADED = loaded
    torch.manual_seed(0)
    got = []
    for n, rows in ((14336, 1), (14336, 3), (172 * 64, 2)):
        x = (torch.randn(rows, n) * 3).to(torch.float16)
        y = HT.hadamard_transform_triton(x)
        want = H.hadamard_transform(x.double())
        assert (y.double() - want).abs().max() <= 2e-3 * want.abs().max(), (n, rows)  # the transform, fp16-rounded
        got += [y, *HT.hadamard_quantize(x, True, torch.tensor(0.05))[:1], *HT.hadamard_quantize(x, False)]
    got += list(HT.hadamard_pieces((torch.randn(1, 14336) * 3).to(torch.bfloat16), 128))
    out[loaded] = got
assert len(out[True]) == len(out[False]) == 3 * 4 + 3
for a, b in zip(out[False], out[True]):
    bits = [t.view(torch.int8) if t.dtype.itemsize == 1 else t for t in (a, b)]
    assert torch.equal(*bits)
print("same")
"""


def test_stage_two_sylvester_read_from_memory_gives_the_same_bits():
    """``SYLVESTER_LOADED``: the tiled kernel's stage-2 Sylvester matrix read from memory instead of built in
    registers: the transform (against float64), its static / dynamic codes and ``w4_i8mma``'s pieces bit for bit
    the same as with the matrix built."""
    assert "same" in run_in_triton_interpreter(_LOADED)
