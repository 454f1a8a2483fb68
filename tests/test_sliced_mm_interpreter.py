"""W8A16 and W4A16 through int8 slices of the activation (``graphquant.kernels.sliced_mm``) in Triton's CPU
interpreter (a subprocess): the product equals the float64 one to fp32 accuracy (the slices are exact for every element within
2^21 of its row's largest; activations spanning five decades here), for 1-16 rows (padded row blocks), per-column
and single weight scales (int4: group scales, with and without zero points, groups of 64 and 128), bias, split-K
(the last split sums), K not a multiple of the tile; rows of zeros give zeros. ``decode_mm`` routes W8A16 / W4A16
there only with ``sliced_mm.W8A16`` / ``W4A16``."""
from __future__ import annotations

from conftest import run_in_triton_interpreter

_CHECK = r"""
import torch
from graphquant.kernels import quant_triton as QT, sliced_mm as SL
torch.manual_seed(0)
checked = 0
for M, N, K, split in ((1, 96, 512, 1), (3, 70, 768, 2), (5, 64, 300, 1), (16, 40, 512, 3)):
    x = (torch.randn(M, K) * torch.logspace(-3, 2, K)[torch.randperm(K)]).to(torch.bfloat16)
    x[0, 7] = 0.0
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    for sw in (torch.rand(N) * 0.01 + 1e-3, torch.tensor([0.004])):
        for bias in (None, torch.randn(N).to(torch.bfloat16)):
            ref = x.double() @ (w.double() * sw.double().reshape(-1, 1)).T
            if bias is not None:
                ref = ref + bias.double()
            cfg = dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=split, num_warps=4, num_stages=1)
            out = SL.sliced_mm(x, w, sw, bias=bias, out_dtype=torch.float32, config=cfg)
            err = ((out.double() - ref).abs() / ref.abs().max(dim=1, keepdim=True).values).max().item()
            assert err < 2e-6, (M, N, K, split, err)
            checked += 1
for M, N, K, G, split, zp, with_bias in ((1, 96, 512, 128, 1, False, False), (3, 70, 768, 64, 2, True, True),
                                          (16, 40, 512, 128, 3, True, False)):
    x = (torch.randn(M, K) * torch.logspace(-3, 2, K)[torch.randperm(K)]).to(torch.bfloat16)
    w4 = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    s = torch.rand(N, K // G) * 0.01
    z = torch.randint(0, 16, (N, K // G), dtype=torch.uint8) if zp else None
    bias = torch.randn(N, dtype=torch.bfloat16) if with_bias else None
    u = torch.stack([w4 & 0xF, w4 >> 4], -1).reshape(N, K).double()
    W = (u - (z.double().repeat_interleave(G, 1) if zp else 8.0)) * s.double().repeat_interleave(G, 1)
    ref = x.double() @ W.T + (bias.double() if with_bias else 0.0)
    out = SL.sliced_mm(x, w4, s, w_kind=QT.W_INT4, w_zero=z, group=G, bias=bias, out_dtype=torch.float32,
                       config=dict(BLOCK_N=32, SPLIT_K=split, num_warps=4, num_stages=1))
    err = ((out.double() - ref).abs() / ref.abs().max(dim=1, keepdim=True).values).max().item()
    assert err < 2e-6, ("int4", M, N, K, G, split, err)
    checked += 1
assert SL.sliced_mm(x, w4, s, w_kind=QT.W_INT4, group=48) is None  # a group it does not take: refused
zero = SL.sliced_mm(torch.zeros(2, 256, dtype=torch.bfloat16), w[:, :256], torch.rand(N), out_dtype=torch.float32,
                    config=dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=1))
assert torch.equal(zero, torch.zeros_like(zero))
assert SL.sliced_mm(torch.randn(SL.MAX_M + 1, 64, dtype=torch.bfloat16), w[:, :64], torch.rand(N)) is None
# routing: decode_mm takes the sliced kernel only when it is enabled
QT._tuned.cache_clear()
QT._device_name = lambda index: "no such GPU"
dev = torch.device("cuda", 0)  # only its index is read
assert QT.decode_choice(1, N, 512, QT.A_FLOAT, QT.W_INT8, 0, dev)[0] != "sliced"
SL.W8A16 = True
assert QT.decode_choice(1, N, 512, QT.A_FLOAT, QT.W_INT8, 0, dev) == ("sliced", {})
assert QT.decode_choice(SL.MAX_M + 1, N, 512, QT.A_FLOAT, QT.W_INT8, 0, dev)[0] != "sliced"
assert QT.decode_choice(1, N, 512, QT.A_INT8, QT.W_INT8, 0, dev)[0] != "sliced"
assert QT.decode_choice(1, N, 512, QT.A_FLOAT, QT.W_INT4, 128, dev)[0] != "sliced"
SL.W4A16 = True
assert QT.decode_choice(1, N, 512, QT.A_FLOAT, QT.W_INT4, 128, dev) == ("sliced", {})
assert QT.decode_choice(1, N, 512, QT.A_FLOAT, QT.W_INT4, 48, dev)[0] != "sliced"
print("checked", checked)
"""


def test_sliced_weight_only_products_equal_the_float64_ones():
    assert "checked 19" in run_in_triton_interpreter(_CHECK)
