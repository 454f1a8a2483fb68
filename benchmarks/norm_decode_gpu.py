"""A decode step's one-row residual add + RMSNorm on the GPU: what Inductor compiles against one-pass Triton kernels
(issue 13).

    PYTHONPATH=. python benchmarks/norm_decode_gpu.py [--out benchmarks/results/norm_decode_gpu.json]

In a W4A16 decode step of the Llama-3-8B-shaped model (``decode_profile.py``) the residual add + RMSNorm before
``qkv`` is Inductor's looped reduction kernel, about 3 us, where a kernel that only copies the row takes about 1.3.
Each case here is 16 launches on 16 rows of 4096 (bf16) captured in one CUDA graph; the table gives the replay
time per launch (kernel plus the gap to the next), and each output's largest difference from the fp32 reference.

H200, 2026-11-30 (``results/norm_decode_gpu.json``): copying the row 1.34 us; Inductor 2.22 (defaults), 1.95
(``combo_kernels``, what the decode step compiles with), 2.24 (``multi_kernel``), 1.94 (``cooperative_reductions``);
the one-pass kernel below 2.10-2.18 with 4-16 warps: no faster, so the decode step keeps Inductor's. (The 3 us the
step's profile shows is the same kernel waiting on its inputs from the kernel before.) ``add_rms_norm_pieces``
(``w4_i8mma``'s pieces of the normalized row) 2.79 with its 4 warps, 3.36 with 2, 2.99 with 8.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from generate_gpu import write_json  # noqa: E402

from graphquant.kernels import quant_triton as QT  # noqa: E402
from graphquant.timing import graph_us  # noqa: E402

EPS = 1e-5


@triton.jit
def copy_kernel(X, Y, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs))


@triton.jit
def add_rms_norm_kernel(X, R, W, S, Y, K, eps, BLOCK_K: tl.constexpr):
    """A decoder layer's residual add and RMSNorm for one row (program ``m``) in one pass over it: ``S = X + R``
    (rounded to ``X``'s dtype, as the layer's add) and Hugging Face's RMSNorm ``Y = W * (S · rsqrt(mean(S²) + eps))``
    (fp32, the normalized row rounded to the dtype before the product with ``W``, the product rounded once), as
    ``quant_triton.add_rms_norm_pieces_kernel`` computes it."""
    DT: tl.constexpr = X.dtype.element_ty
    m = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    ok = offs < K
    x = tl.load(X + m * K + offs, mask=ok, other=0.0)
    r = tl.load(R + m * K + offs, mask=ok, other=0.0)
    w = tl.load(W + offs, mask=ok, other=0.0)
    v = QT._rounded(x.to(tl.float32) + r.to(tl.float32), DT)
    tl.store(S + m * K + offs, v.to(DT), mask=ok)
    rstd = tl.math.rsqrt(tl.sum(v * v, axis=0) / K + eps)
    y = QT._rounded(w.to(tl.float32) * QT._rounded(v * rstd, DT), DT)
    tl.store(Y + m * K + offs, y.to(DT), mask=ok)


def reference(x, r, w):
    s = x + r
    v = s.float()
    y = w * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    return s, y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "norm_decode_gpu.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("norm_decode_gpu.py times CUDA kernels and needs a CUDA GPU; run it on the GPU machine")
    K, n = 4096, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(1, K, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(n)]
    rs = [torch.randn(1, K, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(n)]
    w = (1 + 0.1 * torch.randn(K, device="cuda", generator=g)).to(torch.bfloat16)
    ref_s, ref_y = reference(xs[0].float(), rs[0].float(), w.float())
    rows = []

    def add(name, fn, check=None):
        us = graph_us(lambda: [fn(x, r) for x, r in zip(xs, rs)], reps=1, iters=200) / n
        err = None
        if check is not None:
            s, y = check()
            err = max((s.float() - ref_s).abs().max().item(), (y.float() - ref_y).abs().max().item())
        rows.append({"case": name, "us_per_launch": us, "max_abs_diff": err})
        print(f"{name:58s} {us:7.2f} us" + (f"   max diff {err:.2e}" if err is not None else ""), flush=True)

    ys = [torch.empty_like(x) for x in xs]
    add("copy one row (Triton, 1 program, 4 warps)",
        lambda x, r: copy_kernel[(1,)](x, ys[0], BLOCK=K, num_warps=4))
    for name, opts in (("Inductor add + RMSNorm, defaults", None),
                       ("Inductor add + RMSNorm, combo_kernels", {"combo_kernels": True}),
                       ("Inductor add + RMSNorm, multi_kernel", {"triton.multi_kernel": 1}),
                       ("Inductor add + RMSNorm, cooperative_reductions", {"triton.cooperative_reductions": True})):
        try:
            fn = torch.compile(lambda x, r: reference(x, r, w), dynamic=False, options=opts)
            fn(xs[0], rs[0])
            add(name, fn, lambda fn=fn: fn(xs[0], rs[0]))
        except Exception as e:  # noqa: BLE001 - an option this torch lacks is reported
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        torch._dynamo.reset()
    s_out = [torch.empty_like(x) for x in xs]
    y_out = [torch.empty_like(x) for x in xs]
    for nw in (4, 8, 16):
        add(f"one-pass add_rms_norm_kernel (this script) (1 program, {nw} warps)",
            lambda x, r, nw=nw: add_rms_norm_kernel[(1,)](x, r, w, s_out[0], y_out[0], K, EPS, BLOCK_K=K,
                                                             num_warps=nw),
            lambda nw=nw: (add_rms_norm_kernel[(1,)](xs[0], rs[0], w, s_out[0], y_out[0], K, EPS, BLOCK_K=K,
                                                        num_warps=nw), (s_out[0], y_out[0]))[1])
    add("graphquant add_rms_norm_pieces (current)",
        lambda x, r: QT.add_rms_norm_pieces(x, r, w, EPS, 128))
    P, RS, XS = QT.empty_pieces(K // 512, 512, "cuda")
    for nw in (2, 8):
        add(f"graphquant add_rms_norm_pieces, {nw} warps",
            lambda x, r, nw=nw: QT.add_rms_norm_pieces_kernel[(K // 512,)](
                x, r, w, s_out[0], P, RS, XS, K, EPS, GROUP=128, BLOCK_K=K, num_warps=nw))
    write_json(args.out, {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton":
                          triton.__version__, "K": K, "launches_per_graph": n, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
