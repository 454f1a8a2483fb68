"""Split-K in the decode matmul kernels (``wq_mm``, ``gemv``, ``gemv_packed``, ``w4_mma``): each split writes its slice of an
fp32 workspace and ``split_sum`` adds them up (``wq_mm`` / ``gemv_packed``: each tile's last split, in the same
order, bit for bit); the result equals the one-split launch and an fp32 reference, with
and without bias, for int8 weight-only, int8 W8A8 (also with ``SWAP``, the weight tile as the left operand, bit for bit the
unswapped result), fp8 W8A8 with ``SWAP``, and int4 weights (with zero points for ``w4_mma``), and with
the register prefetch of ``gemv_packed`` / ``w4_mma``. Run in Triton's CPU interpreter (a
subprocess); kernels this Triton's interpreter cannot run (``gemv_packed``'s masks on Triton 3.9) are reported
and skipped, the others must pass."""
from __future__ import annotations

from conftest import run_in_triton_interpreter

_CHECK = r"""
import itertools, torch
from triton.runtime.errors import InterpreterError
from graphquant.kernels import quant_triton as QT
QT._sm_count = lambda i: 132
torch.manual_seed(0)
N, K, G = 96, 512, 32

def deq8(w, s):
    return w.float() * s[:, None]

def deq4(w, s, z=None):
    u = torch.stack([w & 0xF, w >> 4], -1).reshape(w.shape[0], K).float()
    return (u - (8.0 if z is None else z.float().repeat_interleave(G, 1))) * s.repeat_interleave(G, 1)

skipped, checked = set(), 0
for M, bias in itertools.product((1, 3), (False, True)):
    b = torch.randn(N) if bias else None
    a = torch.randn(M, K)  # fp32 activations: the interpreter's bf16 dots are not exact
    w8, s8 = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N) / 100
    q, sa = torch.randint(-127, 128, (M, K), dtype=torch.int8), torch.rand(M, 1) / 50
    w4, s4 = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8), torch.rand(N, K // G) / 100
    z4 = torch.randint(0, 16, (N, K // G), dtype=torch.uint8)
    a16 = torch.randn(M, K).half()
    qf, wf = (torch.randn(M, K) * 8).to(torch.float8_e4m3fn), (torch.randn(N, K) * 8).to(torch.float8_e4m3fn)
    extra = b if bias else 0
    cases = {
        "gemv int8": (lambda c: QT.gemv(a, w8, s8, w_kind=QT.W_INT8, bias=b, out_dtype=torch.float32,
                                        config=dict(BLOCK_N=8, BLOCK_K=128, num_warps=4, num_stages=1, **c)),
                      a @ deq8(w8, s8).T + extra),
        "wq_mm int8": (lambda c: QT.wq_mm(a, w8, s8, w_kind=QT.W_INT8, bias=b, out_dtype=torch.float32,
                                          config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4,
                                                      num_stages=1, **c)),
                       a @ deq8(w8, s8).T + extra),
        "wq_mm w8a8": (lambda c: QT.wq_mm(q, w8, s8, w_kind=QT.W_INT8, a_scale=sa, bias=b, out_dtype=torch.bfloat16,
                                          config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4,
                                                      num_stages=1, **c)),
                       (q.float() * sa) @ deq8(w8, s8).T + extra),
        # SWAP: the weight tile as the left operand (the warpgroup MMA on sm_90); int8 codes sum exactly
        "wq_mm w8a8 swap": (lambda c: QT.wq_mm(q, w8, s8, w_kind=QT.W_INT8, a_scale=sa, bias=b,
                                               out_dtype=torch.bfloat16,
                                               config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4,
                                                           num_stages=1, SWAP=True, **c)),
                            (q.float() * sa) @ deq8(w8, s8).T + extra),
        "wq_mm fp8 swap": (lambda c: QT.wq_mm(qf, wf, s8, w_kind=QT.W_FP8, a_scale=sa, bias=b,
                                              out_dtype=torch.float32,
                                              config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4,
                                                          num_stages=1, SWAP=True, **c)),
                           (qf.float() * sa) @ (wf.float() * s8[:, None]).T + extra),
        "gemv_packed int4": (lambda c: QT.gemv_packed(a, w4, s4, w_kind=QT.W_INT4, group=G, bias=b,
                                                      out_dtype=torch.float32,
                                                      config=dict(BLOCK_N=16, BLOCK_Q=16, num_warps=4, **c)),
                             a @ deq4(w4, s4).T + extra),
        "gemv_packed int8 prefetch": (lambda c: QT.gemv_packed(a, w8, s8, w_kind=QT.W_INT8, bias=b,
                                                               out_dtype=torch.float32,
                                                               config=dict(BLOCK_N=16, BLOCK_Q=16, num_warps=4,
                                                                           PREFETCH=True, **c)),
                                      a @ deq8(w8, s8).T + extra),
        "gemv_packed int4 prefetch": (lambda c: QT.gemv_packed(a, w4, s4, w_kind=QT.W_INT4, group=G, bias=b,
                                                               out_dtype=torch.float32,
                                                               config=dict(BLOCK_N=16, BLOCK_Q=16, num_warps=4,
                                                                           PREFETCH=True, **c)),
                                      a @ deq4(w4, s4).T + extra),
        # w4_mma takes 16-bit activations only; fp16 (the interpreter's bf16 dots are not exact): products
        # of fp16 values and small integers are exact in the fp32 reference
        "w4_mma": (lambda c: QT.w4_mma(a16, w4, s4, group=G, bias=b, out_dtype=torch.float32,
                                       config=dict(BLOCK_N=32, num_warps=4, num_stages=1, **c)),
                   a16.float() @ deq4(w4, s4).T + extra),
        "w4_mma zero point, prefetch": (lambda c: QT.w4_mma(a16, w4, s4, w_zero=z4, group=G, bias=b,
                                                            out_dtype=torch.float32,
                                                            config=dict(BLOCK_N=32, num_warps=4, num_stages=1,
                                                                        PREFETCH=True, **c)),
                                        a16.float() @ deq4(w4, s4, z4).T + extra),
    }
    for name, (run, ref) in cases.items():
        if name in skipped:
            continue
        try:
            outs = [run(dict(SPLIT_K=split)) for split in (1, 2, 4)]
        except InterpreterError as e:
            skipped.add(name)
            print("interpreter cannot run", name, ":", str(e)[:120])
            continue
        if name.startswith(("wq_mm", "gemv_packed")):  # the tiles' last splits add up what split_sum would
            QT.LAST_SPLIT_SUMS = False
            try:
                for split, out in zip((2, 4), outs[1:]):
                    assert torch.equal(run(dict(SPLIT_K=split)), out), (name, M, bias, split)
                    checked += 1
            finally:
                QT.LAST_SPLIT_SUMS = True
            assert int(QT.tile_counters(torch.device("cpu"), 1).abs().sum()) == 0
        if name == "wq_mm w8a8 swap":  # int32 sums of the same products: the unswapped kernel's result exactly
            for split, out in zip((1, 2, 4), outs):
                assert torch.equal(out, cases["wq_mm w8a8"][0](dict(SPLIT_K=split))), (M, bias, split)
        tol = 1e-2 if outs[0].dtype == torch.bfloat16 else 1e-5
        for split, out in zip((1, 2, 4), outs):
            assert out.shape == (M, N) and out.dtype == outs[0].dtype, (name, split, out.shape, out.dtype)
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            assert err < tol, (name, M, bias, split, err)
            checked += 1
assert {"gemv int8", "wq_mm int8", "wq_mm w8a8", "wq_mm w8a8 swap", "wq_mm fp8 swap", "w4_mma", "w4_mma zero point, prefetch"}.isdisjoint(skipped), skipped
print("checked", checked, "skipped", sorted(skipped))
"""


def test_split_k_partials_add_up_to_the_one_split_result():
    assert "checked" in run_in_triton_interpreter(_CHECK)
