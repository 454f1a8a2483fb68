"""Dynamic per-token scales of a few long rows in two launches over tiles (``quant_triton.quantize_rows(...,
split=True)``: the tiles' maxima, then the codes; ``activation.SPLIT_DYNAMIC_ROWS`` asks for it at decode) in
Triton's CPU interpreter (a subprocess): the codes and scales of the one-program-per-row kernel, int8 and fp8,
for row lengths that are and are not a multiple of the tile; rows outside the size rule keep that kernel."""
from __future__ import annotations

from conftest import run_in_triton_interpreter

_CHECK = r"""
import torch
from graphquant.kernels import quant_triton as QT
torch.manual_seed(0)
checked = 0
for K in (8192, 14336, 9000):
    for M in (1, 3):
        assert QT.split_rows(M, K)
        x = (torch.randn(M, K) * 3).to(torch.float16)
        for fp8 in (False, True):
            q, s = QT.quantize_rows(x, fp8, split=True)
            q1, s1 = QT.quantize_rows(x, fp8)
            assert torch.equal(q.view(torch.int8), q1.view(torch.int8)) and torch.equal(s, s1), (K, M, fp8)
            checked += 1
assert not QT.split_rows(QT.SPLIT_ROWS_MAX_M + 1, 14336) and not QT.split_rows(1, 4096)
print("checked", checked)
"""


def test_split_rows_give_the_one_program_per_row_codes():
    assert "checked 12" in run_in_triton_interpreter(_CHECK)
