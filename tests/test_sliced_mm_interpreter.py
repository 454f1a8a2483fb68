"""W8A16 through int8 slices of the activation (``graphquant.kernels.sliced_mm``) in Triton's CPU interpreter (a
subprocess): the product equals the float64 one to fp32 accuracy (the slices are exact for every element within
2^21 of its row's largest; activations spanning five decades here), for 1-16 rows (padded row blocks), per-column
and single weight scales, bias, split-K (the last split sums), K not a multiple of the tile; an activation
element that does not fit the first slice's range errs by its rounding only; rows of zeros give zeros.
``decode_mm`` routes W8A16 there only with ``sliced_mm.ENABLED``."""
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
zero = SL.sliced_mm(torch.zeros(2, 256, dtype=torch.bfloat16), w[:, :256], torch.rand(N), out_dtype=torch.float32,
                    config=dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=1))
assert torch.equal(zero, torch.zeros_like(zero))
assert SL.sliced_mm(torch.randn(SL.MAX_M + 1, 64, dtype=torch.bfloat16), w[:, :64], torch.rand(N)) is None
# routing: decode_mm takes the sliced kernel only when it is enabled
QT._tuned.cache_clear()
QT._device_name = lambda index: "no such GPU"
dev = torch.device("cuda", 0)  # only its index is read
assert QT.decode_choice(1, N, 512, QT.A_FLOAT, QT.W_INT8, 0, dev)[0] != "sliced"
SL.ENABLED = True
assert QT.decode_choice(1, N, 512, QT.A_FLOAT, QT.W_INT8, 0, dev) == ("sliced", {})
assert QT.decode_choice(SL.MAX_M + 1, N, 512, QT.A_FLOAT, QT.W_INT8, 0, dev)[0] != "sliced"
assert QT.decode_choice(1, N, 512, QT.A_INT8, QT.W_INT8, 0, dev)[0] != "sliced"
print("checked", checked)
"""


def test_sliced_w8a16_equals_the_float64_product():
    assert "checked 16" in run_in_triton_interpreter(_CHECK)
