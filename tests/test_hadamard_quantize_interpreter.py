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


_GATED = r"""
import torch
from graphquant.hadamard import silu_mul
from graphquant.kernels import hadamard_triton as HT
torch.manual_seed(0)
checked = 0
for n in (4096, 172 * 64):
    for rows in (1, 3, 20):  # tiled (decode) and, for 4096 at 20 rows, the persistent kernels
        gu = (torch.randn(rows, 2 * n) * 3).to(torch.float16)
        x = silu_mul(gu)
        want, got = HT.hadamard_transform_triton(x), HT.hadamard_transform_triton(gu, gated=True)
        assert got.shape == (rows, n)
        # the kernel's sigmoid (the interpreter's numpy exp) and torch's may differ in the last fp32 bit
        assert (got.float() - want.float()).abs().max() <= 2 ** -9 * want.float().abs().max(), (n, rows)
        checked += 1
        if not HT.fusable(n, x.dtype, rows, gated=True):
            assert n == 172 * 64 and rows == 20  # its row fits no persistent kernel
            continue
        for fp8 in (False, True):
            for static in (False, True):
                s = torch.tensor(0.05) if static else None
                q0, s0 = HT.hadamard_quantize(x, fp8, s)
                q1, s1 = HT.hadamard_quantize(gu, fp8, s, gated=True)
                assert q1.shape == (rows, n) and (s1 is None) == static
                d = (q0.float() - q1.float()).abs()
                step = 32.0 if fp8 else 1.0  # one code apart (fp8 codes here are below 448: steps up to 32)
                assert d.max() <= step and (d > 0).float().mean() < 0.01, (n, rows, fp8, static, d.max())
                assert static or ((s1 - s0).abs() <= 1e-3 * s0).all()
                checked += 1
print("checked", checked)
"""


def test_gated_transform_and_quantize_read_the_gate_up_pair():
    """``gated``: the transform (and the fused quantization) of ``silu(gate)·up`` from a gate|up pair, as the
    kernels give it for the product computed first (``hadamard.silu_mul``), up to the last bit of the SiLU."""
    assert "checked 26" in run_in_triton_interpreter(_GATED)
