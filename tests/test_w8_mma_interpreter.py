"""W8A16 on the fp16 tensor cores (``quant_triton.w8_mma``) in Triton's CPU interpreter (a subprocess; the
interpreter runs no PTX, so the int8 -> fp16 conversion takes its element-by-element form, the same bits): the
product equals the float64 one to fp32 accuracy for activations spanning five decades at any overall scale
(3e4: past fp16's range; 1e-3), 1-40 rows (one and several row blocks), per-column and single weight scales, bias,
split-K (the last split sums), K not a multiple of the tile, rows of zeros, a power of two per row and tile or
(``ONE_SCALE``) per row; ``decode_choice`` picks it for
W8A16 where the H200 table measured it fastest (16 rows of every shape, one row of gate/up) and not where
``gemv_packed`` won."""
from __future__ import annotations

from conftest import run_in_triton_interpreter

_CHECK = r"""
import torch
from graphquant.kernels import quant_triton as QT
torch.manual_seed(0)
checked = 0
CASES = ((1, 96, 512, 1, False, True, 1.0), (3, 70, 768, 2, True, True, 3e4), (16, 64, 300, 1, True, False, 1e-3),
         (40, 40, 512, 3, False, True, 1.0))
for M, N, K, split, with_bias, per_channel, scale in CASES:
    x = (torch.randn(M, K) * torch.logspace(-3, 2, K)[torch.randperm(K)] * scale).to(torch.bfloat16)
    if M > 2:
        x[1] = 0
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    sw = torch.rand(N if per_channel else 1) * 0.01 + 1e-3
    bias = torch.randn(N, dtype=torch.bfloat16) if with_bias else None
    ref = x.double() @ (w.double() * sw.double().reshape(-1, 1)).T + (bias.double() if with_bias else 0.0)
    out = QT.w8_mma(x, w, sw, bias=bias, out_dtype=torch.float32,
                    config=dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=split, num_warps=4, num_stages=1,
                                ONE_SCALE=checked % 2 == 1))
    err = ((out.double() - ref).abs() / ref.abs().max(dim=1, keepdim=True).values.clamp_min(1e-30)).max().item()
    assert err < 2e-6, (M, N, K, split, err)
    if M > 2:
        assert not out[1].any() if not with_bias else torch.equal(out[1], bias.float())
    checked += 1
assert QT.w8_mma(x, w, sw, w_kind=QT.W_FP8) is None and QT.w8_mma(x.repeat(2, 1)[:65], w, sw) is None
QT._device_name = lambda index: "NVIDIA H200"
dev = torch.device("cuda", 0)  # only its index is read
assert QT.decode_choice(1, 4096, 4096, QT.A_FLOAT, QT.W_INT8, 0, dev)[0] == "gemv_packed"
for M, N, K in ((1, 28672, 4096), (16, 28672, 4096), (16, 4096, 14336), (9, 6144, 4096)):
    impl, cfg = QT.decode_choice(M, N, K, QT.A_FLOAT, QT.W_INT8, 0, dev)
    assert impl == "w8_mma" and {"BLOCK_N", "BLOCK_K", "SPLIT_K"} <= set(cfg) and "us" not in cfg, (M, impl, cfg)
assert QT.decode_choice(1, 4096, 4096, QT.A_INT8, QT.W_INT8, 0, dev)[0] != "w8_mma"
print("checked", checked)
"""


def test_w8_mma_equals_the_float64_product():
    assert "checked 4" in run_in_triton_interpreter(_CHECK)
