"""W8A8 int8 prefill matmuls on a CUDA GPU: graphquant's fused Triton kernel vs ``torch._int_mm`` + epilogue.

    python benchmarks/int8_prefill_gpu.py [--tokens 16384] [--out benchmarks/results/int8_prefill_gpu.json]

For each Llama-3-8B projection shape (q|k|v, o, gate|up, down) at ``--tokens`` rows: bf16 ``F.linear``
(cuBLAS), fp8 e4m3 ``torch._scaled_mm`` with per-row / per-column scales (what graphquant's fp8 prefill runs),
int8 ``torch._int_mm`` followed by ``quant_triton.scale_epilogue`` (``int8_mm.int8_linear`` today) and
``int8_gemm.int8_gemm`` (one kernel, the scales fused) with its default tile and a few others. Times are
medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``); each int8_gemm result must equal the
``_int_mm`` path bit for bit. Prints a table (ms, TOPS, speedup over bf16 and over ``_int_mm`` + epilogue) and
which tile is fastest per shape: the evidence for ``int8_mm.PREFILL_TRITON`` and ``int8_gemm.DEFAULT_CONFIG``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from generate_gpu import write_json  # noqa: E402
from hadamard_gpu import bench_graph  # noqa: E402

SHAPES = {"q|k|v": (6144, 4096), "o": (4096, 4096), "gate|up": (28672, 4096), "down": (4096, 14336)}
CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
]


def describe(cfg: dict) -> str:
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}")


def measure(name: str, M: int, N: int, K: int) -> dict:
    from graphquant.kernels import quant_triton as QT
    from graphquant.kernels.int8_gemm import int8_gemm

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    wf = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).to(torch.bfloat16)
    a = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8, generator=g)
    sa, sw = torch.rand(M, 1, device="cuda") / 50, torch.rand(N, device="cuda") / 100
    a8, w8 = x.to(torch.float8_e4m3fn), wf.to(torch.float8_e4m3fn)
    sw8 = sw.reshape(1, N)

    def int_mm():
        return QT.scale_epilogue(torch._int_mm(a, w.t()), sa, sw, None, torch.bfloat16)

    row = {"shape": name, "M": M, "N": N, "K": K, "ms": {}, "errors": {}}
    ops = 2.0 * M * N * K
    candidates = {"bf16 F.linear": lambda: F.linear(x, wf),
                  "fp8 _scaled_mm": lambda: torch._scaled_mm(a8, w8.t(), scale_a=sa, scale_b=sw8,
                                                             out_dtype=torch.bfloat16),
                  "int8 _int_mm + epilogue": int_mm}
    want = int_mm()
    for cfg in CONFIGS:
        candidates[f"int8_gemm {describe(cfg)}"] = lambda cfg=cfg: int8_gemm(a, w, sa, sw, None, torch.bfloat16, cfg)
    for label, fn in candidates.items():
        try:
            out = fn()
            if label.startswith("int8_gemm") and not torch.equal(out, want):
                row["errors"][label] = "differs from _int_mm + epilogue"
                continue
            row["ms"][label] = bench_graph(fn)
        except Exception as e:  # noqa: BLE001 - a tile that does not compile or fit is reported, not fatal
            row["errors"][label] = f"{type(e).__name__}: {str(e)[:160]}"
    row["tops"] = {k: ops / (v * 1e-3) / 1e12 for k, v in row["ms"].items()}
    ours = {k: v for k, v in row["ms"].items() if k.startswith("int8_gemm")}
    if ours:
        row["int8_gemm_best"] = min(ours, key=ours.get)
        base = row["ms"].get("int8 _int_mm + epilogue")
        row["best_over_int_mm"] = base / ours[row["int8_gemm_best"]] if base else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_prefill_gpu.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("int8_prefill_gpu.py needs a CUDA GPU")
    t0 = time.time()
    rows = [measure(name, args.tokens, N, K) for name, (N, K) in SHAPES.items()]
    labels = list(dict.fromkeys(k for r in rows for k in r["ms"]))
    print(f"{'shape':8s} {'M x N x K':>20s} " + " ".join(f"{k[:24]:>24s}" for k in labels))
    for r in rows:
        cells = [f"{r['ms'][k]:8.3f} ms {r['tops'][k]:5.0f}T" if k in r["ms"] else f"{'-':>24s}" for k in labels]
        print(f"{r['shape']:8s} {r['M']:>6d}x{r['N']:>5d}x{r['K']:>5d} " + " ".join(f"{c:>24s}" for c in cells))
    for r in rows:
        best = r.get("int8_gemm_best")
        ratio = r.get("best_over_int_mm")
        print(f"{r['shape']:8s} fastest int8_gemm: {best} ({ratio:.2f}x _int_mm + epilogue)" if best and ratio
              else f"{r['shape']:8s} no int8_gemm result")
        for k, e in r["errors"].items():
            print(f"    {k}: {e}")
    total = {k: sum(r["ms"].get(k, float("nan")) for r in rows) for k in labels}
    print("sum over the four shapes (one layer's projections): "
          + ", ".join(f"{k} {v:.3f} ms" for k, v in total.items()))
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens,
           "rows": rows, "sum_ms": total, "elapsed_s": time.time() - t0}
    write_json(args.out, doc)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
