"""W8A8 decode with the activation quantization inside the matmul (``quant_triton.quant_act_mm``, ``wq_mm``'s
``QUANT_A``) in Triton's CPU interpreter (a subprocess): bit for bit the result of ``quantize_rows`` and then
``wq_mm`` on those codes, for int8 codes (integer accumulation) under a static per-tensor scale and per-row
dynamic scales (computed over the row's whole K by every split), 1-20 rows, split-K (the last split sums and the
split_sum launch), bias, rows of zeros; ``quant_act_mm`` follows ``decode_choice`` and returns None where it
does not pick ``wq_mm``."""
from __future__ import annotations

from conftest import run_in_triton_interpreter

_CHECK = r"""
import itertools, torch
from graphquant.kernels import quant_triton as QT
QT._sm_count = lambda i: 132
torch.manual_seed(0)
checked = 0
for M, N, K, split, bias, static in itertools.product((1, 5, 20), (48,), (320,), (1, 3), (False, True), (False, True)):
    x = torch.randn(M, K) * torch.logspace(-2, 1, K)[torch.randperm(K)]
    if M > 2:
        x[1] = 0
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    sw = torch.rand(N) / 100
    b = torch.randn(N) if bias else None
    s = torch.tensor([0.021]) if static else None
    cfg = dict(BLOCK_M=16 if M <= 16 else 32, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=1, SPLIT_K=split)
    QT.LAST_SPLIT_SUMS = checked % 2 == 0
    q, sa = QT.quantize_rows(x, False, static_scale=s)
    want = QT.wq_mm(q, w, sw, w_kind=QT.W_INT8, a_scale=(s.reshape(1, 1) if static else sa), bias=b,
                    out_dtype=torch.float32, config=dict(cfg))
    got = QT.wq_mm(x, w, sw, w_kind=QT.W_INT8, a_scale=s, bias=b, out_dtype=torch.float32, config=dict(cfg),
                   quantize_a=QT.A_INT8)
    assert torch.equal(got, want), (M, split, bias, static, (got - want).abs().max())
    checked += 1
QT.LAST_SPLIT_SUMS = True
QT._device_name = lambda index: "NVIDIA H200"
torch.cuda.current_device = lambda: 0  # CPU tensors: decode_choice asks for the current device's name
table = {(QT.A_INT8, QT.W_INT8, 48, 320, 1): dict(impl="wq_mm", BLOCK_N=32, BLOCK_K=64, SPLIT_K=2, num_warps=4,
                                                  num_stages=1),
         (QT.A_INT8, QT.W_INT8, 48, 320, 4): dict(impl="gemv", BLOCK_N=4, BLOCK_K=64, SPLIT_K=1, num_warps=4,
                                                  num_stages=1)}
QT._tuned = lambda name: table
x = torch.randn(1, 320)
q, sa = QT.quantize_rows(x, False)
want = QT.decode_mm(q, w, sw, w_kind=QT.W_INT8, a_scale=sa, out_dtype=torch.float32)
got = QT.quant_act_mm(x, w, sw, w_kind=QT.W_INT8, fp8_codes=False, out_dtype=torch.float32)
assert torch.equal(got, want)
assert QT.quant_act_mm(torch.randn(3, 320), w, sw, w_kind=QT.W_INT8, fp8_codes=False) is None  # gemv's shape
print("checked", checked)
"""


def test_quantization_inside_the_matmul_equals_the_two_launches():
    assert "checked 24" in run_in_triton_interpreter(_CHECK)
