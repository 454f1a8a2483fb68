"""W4A16 on the int8 tensor cores (``quant_triton.w4_i8mma``: the activation split into four exact int8 pieces
by ``int8_pieces_kernel``, the nibbles multiplied as int8 codes) in Triton's CPU interpreter (a subprocess; the
interpreter runs no PTX, so the nibble unpacking takes its element-by-element form, the same values): the product
equals the float64 one to fp32 accuracy for activations spanning five decades at any overall scale (3e4; 1e-3;
1e-30), 1-4 rows (groups per step lowered to fit them), groups of 32 to 256, zero points or the implicit 8, bias,
split-K (the last split sums, and the split_sum launch), rows of zeros; ``decode_choice`` / ``decode_mm`` run it
where the tuned table names it, and it refuses what it cannot take."""
from __future__ import annotations

from conftest import run_in_triton_interpreter

_CHECK = r"""
import torch
from graphquant.kernels import quant_triton as QT
torch.manual_seed(0)
checked = 0
CASES = ((1, 96, 512, 128, 1, False, False, 1.0, 4), (3, 70, 768, 128, 2, True, True, 3e4, 4),
         (2, 64, 256, 32, 3, True, False, 1e-3, 4), (4, 40, 512, 64, 3, False, True, 1.0, 1),
         (1, 48, 1024, 256, 2, True, True, 1.0, 4), (1, 64, 512, 128, 1, False, False, 1e-30, 2))
for M, N, K, group, split, with_bias, with_zero, scale, gps in CASES:
    x = (torch.randn(M, K) * torch.logspace(-3, 2, K)[torch.randperm(K)] * scale).to(torch.bfloat16)
    if M > 2:
        x[1] = 0
    w = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    G = K // group
    sw = torch.rand(N, G) * 0.01 + 1e-3
    zw = torch.randint(0, 16, (N, G), dtype=torch.uint8) if with_zero else None
    bias = torch.randn(N, dtype=torch.bfloat16) if with_bias else None
    u = torch.stack([w & 0xF, w >> 4], dim=-1).reshape(N, K).double()
    z = (zw.double() if with_zero else torch.full((N, G), 8.0, dtype=torch.float64)).repeat_interleave(group, 1)
    deq = (u - z) * sw.double().repeat_interleave(group, 1)
    ref = x.double() @ deq.T + (bias.double() if with_bias else 0.0)
    QT.LAST_SPLIT_SUMS = checked % 2 == 0
    out = QT.w4_i8mma(x, w, sw, w_zero=zw, bias=bias, group=group, out_dtype=torch.float32,
                      config=dict(BLOCK_N=32, SPLIT_K=split, GPS=gps, num_warps=4, num_stages=1))
    err = ((out.double() - ref).abs() / ref.abs().max(dim=1, keepdim=True).values.clamp_min(1e-300)).max().item()
    assert err < 1e-6, (M, N, K, group, split, err)
    if M > 2:
        assert not out[1].any() if not with_bias else torch.equal(out[1], bias.float())
    checked += 1
QT.LAST_SPLIT_SUMS = True
assert QT.w4_i8mma(x, w, sw, w_kind=QT.W_INT8, group=group) is None
assert QT.w4_i8mma(x.repeat(5, 1)[:5], w, sw, group=group) is None
assert QT.w4_i8mma(x.float(), w, sw, group=group) is None
assert QT.w4_i8mma(x, w, sw, group=48) is None
QT._device_name = lambda index: "NVIDIA H200"
dev = torch.device("cuda", 0)  # only its index is read
cfg = dict(BLOCK_N=32, SPLIT_K=2, GPS=4, num_warps=4, num_stages=1)
table = {(QT.A_FLOAT, QT.W_INT4, N, K, 1): dict(impl="w4_i8mma", **cfg, us=1.0)}
QT._tuned = lambda name: table
assert QT.decode_choice(1, N, K, QT.A_FLOAT, QT.W_INT4, group, dev) == ("w4_i8mma", cfg)
torch.cuda.current_device = lambda: 0  # CPU tensors: decode_choice asks for the current device's name
got = QT.decode_mm(x, w, sw, w_kind=QT.W_INT4, w_zero=zw, bias=bias, group=group, out_dtype=torch.float32)
want = QT.w4_i8mma(x, w, sw, w_zero=zw, bias=bias, group=group, out_dtype=torch.float32, config=cfg)
assert torch.equal(got, want)
print("checked", checked)
"""


def test_w4_i8mma_equals_the_float64_product():
    assert "checked 6" in run_in_triton_interpreter(_CHECK)
