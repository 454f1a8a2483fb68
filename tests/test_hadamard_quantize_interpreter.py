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


def test_fusable_is_asked_inside_a_compiled_graph():
    """The lowered graphs ask ``fusable`` while Dynamo traces them (``activation._fused_under_compile``): for an
    order outside the measured plans (1152, gq-llama-20m's intermediate size) its plan search must not break
    a ``fullgraph`` compile (it did on the GPU: ``min`` with a key is not traceable)."""
    import torch

    from graphquant.kernels import hadamard_triton as HT

    HT.plan.cache_clear()
    f = torch.compile(lambda t: t + int(HT.fusable(1152, torch.bfloat16, 1))
                      + 2 * int(HT.fusable(11008, torch.bfloat16, 4096)), fullgraph=True, backend="eager")
    assert f(torch.zeros(2)).tolist() == [1.0, 1.0]  # 36 x 32 at one row; 11008's row fits no persistent kernel
