"""W4A16 on the fp16 tensor cores (``quant_triton.w4_f16mma``) in Triton's CPU interpreter (a subprocess; the
interpreter runs no PTX, so the nibble -> fp16 conversion takes its element-by-element form, the same values): the
product equals the float64 one to fp32 accuracy for activations spanning five decades at any overall scale (3e4:
past fp16's range; 1e-3), 1-40 rows (one and several row blocks), groups of 32 and 128, zero points or the implicit
8, bias, split-K (the last split sums, and the split_sum launch), rows of zeros; ``decode_choice`` /
``decode_mm`` run it where the tuned table names it, and it refuses what it cannot take."""
from __future__ import annotations

from conftest import run_in_triton_interpreter

_CHECK = r"""
import torch
from graphquant.kernels import quant_triton as QT
from w4a16_cases import case, decode_table_runs
torch.manual_seed(0)
checked = 0
CASES = ((1, 96, 512, 128, 1, False, False, 1.0), (3, 70, 768, 128, 2, True, True, 3e4),
         (16, 64, 256, 32, 1, True, False, 1e-3), (40, 40, 512, 128, 3, False, True, 1.0),
         (5, 48, 512, 64, 4, True, True, 1.0))
for M, N, K, group, split, with_bias, with_zero, scale in CASES:
    x, w, sw, zw, bias, ref = case(M, N, K, group, with_bias, with_zero, scale)
    QT.LAST_SPLIT_SUMS = checked % 2 == 0
    out = QT.w4_f16mma(x, w, sw, w_zero=zw, bias=bias, group=group, out_dtype=torch.float32,
                       config=dict(BLOCK_N=32, SPLIT_K=split, num_warps=4, num_stages=1))
    err = ((out.double() - ref).abs() / ref.abs().max(dim=1, keepdim=True).values.clamp_min(1e-30)).max().item()
    assert err < 2e-6, (M, N, K, group, split, err)
    if M > 2:
        assert not out[1].any() if not with_bias else torch.equal(out[1], bias.float())
    checked += 1
QT.LAST_SPLIT_SUMS = True
assert QT.w4_f16mma(x, w, sw, w_kind=QT.W_INT8, group=group) is None
assert QT.w4_f16mma(x.repeat(13, 1)[:65], w, sw, group=group) is None
assert QT.w4_f16mma(x, w, sw, group=48) is None
decode_table_runs(QT, "w4_f16mma", 9, 16, dict(BLOCK_N=32, SPLIT_K=2, num_warps=4, num_stages=1),
                  x, w, sw, zw, bias, group)
print("checked", checked)
"""


def test_w4_f16mma_equals_the_float64_product():
    assert "checked 5" in run_in_triton_interpreter(_CHECK)
