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
from w4a16_cases import case, decode_table_runs
torch.manual_seed(0)
checked = 0
CASES = ((1, 96, 512, 128, 1, False, False, 1.0, 4), (3, 70, 768, 128, 2, True, True, 3e4, 4),
         (2, 64, 256, 32, 3, True, False, 1e-3, 4), (4, 40, 512, 64, 3, False, True, 1.0, 1),
         (1, 48, 1024, 256, 2, True, True, 1.0, 4), (1, 64, 512, 128, 1, False, False, 1e-30, 2),
         (2, 96, 1536, 64, 3, False, True, 1.0, 2))
for M, N, K, group, split, with_bias, with_zero, scale, gps in CASES:
    x, w, sw, zw, bias, ref = case(M, N, K, group, with_bias, with_zero, scale)
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
decode_table_runs(QT, "w4_i8mma", 1, 1, dict(BLOCK_N=32, SPLIT_K=2, GPS=4, num_warps=4, num_stages=1),
                  x, w, sw, zw, bias, group)
print("checked", checked)
"""


def test_w4_i8mma_equals_the_float64_product():
    assert "checked 7" in run_in_triton_interpreter(_CHECK)


_FUSED = r"""
import torch
from graphquant.kernels import quant_triton as QT
from graphquant.kernels import hadamard_triton as HT
torch.manual_seed(0)
n = 14336
assert HT.pieces_fusable(n, 128, 1) and not HT.pieces_fusable(n, 128, 2) and not HT.pieces_fusable(n, 64, 1)
assert not HT.pieces_fusable(4096, 128, 1) and not HT.pieces_fusable(1152, 128, 1)
for dtype in (torch.bfloat16, torch.float16):
    x = (torch.randn(1, n) * torch.logspace(-2, 1, n)[torch.randperm(n)]).to(dtype)
    y = HT.hadamard_transform_triton(x, False)
    P, RS, XS = HT.hadamard_pieces(x, 128)
    want = [torch.empty_like(t) for t in (P, RS, XS)]
    QT.int8_pieces_kernel[(n // 512,)](y, *want, 1, y.stride(0), 0, GROUP=128, GPS=4, num_warps=4)
    assert all(torch.equal(a, b) for a, b in zip((P, RS, XS), want)), dtype
    w = torch.randint(0, 256, (48, n // 2), dtype=torch.uint8)
    sw = torch.rand(48, n // 128) * 0.01
    cfg = dict(BLOCK_N=32, SPLIT_K=4, GPS=4, num_warps=4, num_stages=1)
    assert torch.equal(QT.w4_i8mma(y, w, sw, group=128, out_dtype=torch.float32, config=cfg),
                       QT.w4_i8mma(x, w, sw, group=128, out_dtype=torch.float32, config=cfg, pieces=(P, RS, XS)))
    assert QT.w4_i8mma(x, w, sw, group=128, config=dict(cfg, GPS=2), pieces=(P, RS, XS)) is None
try:
    HT.hadamard_pieces(torch.zeros(2, n, dtype=torch.bfloat16), 128)
except ValueError as e:
    assert "no fused Hadamard" in str(e)
else:
    raise AssertionError("two rows were taken")
print("fused ok")
"""


def test_hadamard_pieces_equal_the_unfused_transform_then_pieces():
    """QuaRot's online R4 with ``w4_i8mma``'s int8 pieces made in the Hadamard kernel's epilogue
    (``hadamard_triton.hadamard_pieces``, Llama-3-8B's 14336 = 112 x 128: one program per step of four groups of
    128) gives bit for bit the pieces, scales and sums of ``int8_pieces_kernel`` on ``hadamard_transform``'s bf16 /
    fp16 output, hence the same product; orders or groups it cannot take are refused."""
    assert "fused ok" in run_in_triton_interpreter(_FUSED)


_GATED = r"""
import torch
from graphquant.kernels import quant_triton as QT
from graphquant.kernels.int4_mm import silu_mul
torch.manual_seed(0)
checked = 0
for M, K, group, gps, with_zero, dtype in ((1, 1024, 128, 4, False, torch.bfloat16), (2, 512, 64, 2, True, torch.float16),
                                          (4, 256, 128, 1, False, torch.bfloat16)):
    N = 40
    pair = (torch.randn(M, 2 * K) * 3).to(dtype)
    w = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    sw = torch.rand(N, K // group) * 0.01 + 1e-3
    zw = torch.randint(0, 16, (N, K // group), dtype=torch.uint8) if with_zero else None
    cfg = dict(BLOCK_N=32, SPLIT_K=2, GPS=gps, num_warps=4, num_stages=1)
    got = QT.w4_i8mma(pair, w, sw, w_zero=zw, group=group, out_dtype=torch.float32, config=cfg, gated=True)
    h = silu_mul(pair)
    want = QT.w4_i8mma(h, w, sw, w_zero=zw, group=group, out_dtype=torch.float32, config=cfg)
    # the SiLU in Triton and in torch may round one element of h to a neighbouring bf16 value
    assert (got - want).abs().max() <= 1e-3 * want.abs().max(), (M, K, (got - want).abs().max())
    assert (got == want).float().mean() > 0.9, (M, K)
    swapped = QT.w4_i8mma(torch.cat(pair.chunk(2, -1)[::-1], -1), w, sw, w_zero=zw, group=group,
                          out_dtype=torch.float32, config=cfg, gated=True)
    assert (swapped - want).abs().max() > 0.1 * want.abs().max()  # the gate half is the first one
    checked += 1
assert QT.w4_i8mma(pair[:, :-64], w, sw, group=group, gated=True) is None  # K does not match the weight
assert QT.w4_i8mma(pair[:, 1:], w, sw, group=group, gated=True) is None    # an odd width is not a pair
print("gated", checked)
"""


def test_w4_i8mma_gated_makes_its_operand_from_the_gate_up_pair():
    """``w4_i8mma(pair, gated=True)``: the pieces launch computes ``silu(gate) * up`` from a gated MLP's gate|up
    pair (gate first) and gives the product of ``int4_mm.silu_mul(pair)`` (up to the SiLU's last-bit rounding in
    Triton vs torch), bf16 and fp16, 1-4 rows, zero points, groups per step lowered; pairs that do not fit are
    refused."""
    assert "gated 3" in run_in_triton_interpreter(_GATED)


_ADD_NORM = r"""
import torch
from graphquant.kernels import quant_triton as QT
from graphquant.kernels.int4_mm import rms_norm
torch.manual_seed(0)
checked = same = total = 0
for K, group, dtype in ((1024, 128, torch.bfloat16), (512, 64, torch.float16), (2048, 128, torch.bfloat16)):
    x = (torch.randn(1, K) * torch.logspace(-2, 1, K)[torch.randperm(K)]).to(dtype)
    r = (torch.randn(1, K) * 4).to(dtype)
    nw = (torch.rand(K) + 0.5).to(dtype)
    s, pieces = QT.add_rms_norm_pieces(x, r, nw, 1e-5, group)
    assert torch.equal(s, r + x), K  # the layer's add, rounded once
    h = rms_norm(r + x, nw, 1e-5)
    want = [torch.empty_like(t) for t in pieces]
    QT.int8_pieces_kernel[(K // (4 * group),)](h, *want, 1, h.stride(0), 0, GROUP=group, GPS=4, num_warps=4)
    # the pieces hold the normalized row exactly: it is h but for the rsqrt's last bit (libdevice vs torch)
    P, RS, XS = pieces
    full = torch.stack(P.float().chunk(2, -1), -1).reshape(P.shape)  # even / odd columns back in place
    back = torch.cat([sum(full[i, 4 * g + p, g * group:(g + 1) * group] * RS[i, 4 * g + p] for p in range(4))
                      for i in range(P.shape[0]) for g in range(4)]).reshape(1, K)
    assert (back - h.float()).abs().max() <= 2 * 2.0 ** -7 * h.float().abs().max(), K
    same += sum(int(torch.equal(a, b)) for a, b in zip(pieces, want))
    total += 3
    w = torch.randint(0, 256, (48, K // 2), dtype=torch.uint8)
    sw = torch.rand(48, K // group) * 0.01
    cfg = dict(BLOCK_N=32, SPLIT_K=2, GPS=4, num_warps=4, num_stages=1)
    got = QT.w4_i8mma(s, w, sw, group=group, out_dtype=torch.float32, config=cfg, pieces=pieces)
    ref = QT.w4_i8mma(h, w, sw, group=group, out_dtype=torch.float32, config=cfg)
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max(), (K, (got - ref).abs().max())
    checked += 1
assert same >= total - 3, (same, total)  # at most one case's pieces move by the rsqrt's rounding
for bad in ((torch.zeros(2, 1024, dtype=torch.bfloat16),), (torch.zeros(1, 1000, dtype=torch.bfloat16),)):
    try:
        QT.add_rms_norm_pieces(bad[0], bad[0], bad[0][0], 1e-5, 128)
    except ValueError:
        pass
    else:
        raise AssertionError(bad[0].shape)
print("add norm", checked, same, total)
"""


def test_add_rms_norm_pieces_make_the_pieces_of_the_normalized_sum():
    """``quant_triton.add_rms_norm_pieces`` (``prepare``'s step 6): one launch returns a decoder layer's residual sum
    bit for bit and ``w4_i8mma``'s int8 pieces of its Hugging Face RMSNorm (``int4_mm.rms_norm``): they hold the
    normalized row (up to the rsqrt's last bit, Triton's libdevice vs torch), mostly bit for bit the pieces
    ``int8_pieces_kernel`` makes of the reference norm, and the product on them matches; rows it cannot take are
    refused."""
    out = run_in_triton_interpreter(_ADD_NORM)
    assert "add norm 3" in out, out
