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


_GLU = r"""
import torch
from graphquant import hadamard as H
from graphquant.kernels import hadamard_triton as HT
from graphquant.kernels import quant_triton as QT
torch.manual_seed(0)
checked = 0
n = 4096
for rows in (1, 3, 20):  # the tiled kernel (few rows) and the persistent one
    gu = (torch.randn(rows, 2 * n) * 3).to(torch.float16)
    h = H.silu_mul(gu)  # fp32 gating rounded once, as the kernel does on load
    y = HT.hadamard_transform_triton(gu, glu=True)
    want = HT.hadamard_transform_triton(h)
    assert y.shape == (rows, n)
    # the kernel's sigmoid may differ from torch's in the last fp32 bit: a gated value then rounds to a
    # neighbouring fp16 (relative 2^-11), which moves the transform by at most that over sqrt(n)
    assert float((y.float() - want.float()).abs().max()) <= float(want.float().abs().max()) * 2e-3, rows
    for fp8 in (False, True):
        for static in (False, True):
            s = torch.tensor(0.05) if static else None
            if not HT.fusable(n, gu.dtype, rows, glu=True):
                continue
            q, sc = HT.hadamard_quantize(gu, fp8, s, glu=True)
            want_q, want_s = QT.quantize_rows(y, fp8, s)  # the same codes as quantizing the gated transform
            assert q.shape == (rows, n) and (sc is None) == static
            assert torch.equal(q.view(torch.int8), want_q.view(torch.int8)), (rows, fp8, static)
            assert static or torch.equal(sc, want_s), (rows, fp8)
            checked += 1
print("checked", checked)
"""


def test_glu_input_is_gated_on_load():
    """``glu=True``: the rows are ``[g | u]`` (a fused gate|up output) and the kernels transform (and quantize)
    ``silu(g) * u``, computed as they load it: the transform of ``graphquant.hadamard.silu_mul(gu)`` to its rounding,
    and exactly the codes of quantizing the gated transform, tiled and persistent, int8 and fp8, static and dynamic."""
    out = run_in_triton_interpreter(_GLU)
    assert "checked" in out and int(out.split("checked")[1]) >= 8, out
