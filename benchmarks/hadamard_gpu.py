"""Hadamard transform speed on a CUDA GPU: Triton kernel vs dense matmul vs torch fallback vs copy.

    python benchmarks/hadamard_gpu.py [--tokens 8192] [--sizes 128 4096 14336 18944] [--sweep]

For each order n, on an (tokens, n) bf16 tensor: the Triton transform (``graphquant::hadamard_transform``
on CUDA), a dense ``x @ Hᵀ`` in bf16 (cuBLAS), the torch fallback (``graphquant.hadamard.hadamard_transform``,
O(n log n) in float32) and a plain ``x.clone()``. Median times from ``triton.testing.do_bench``;
ratios are to the copy. Correctness of every method is checked against float64 on a slice of the
rows in the same run. ``--sweep`` also times the other kernel plans (tiling choices) for each n.
Writes ``benchmarks/results/hadamard_gpu.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from graphquant import hadamard as H  # noqa: E402

TARGET = 1.5  # the Triton transform should be within 1.5× of a copy (n = 128, 4096, 14336)


def bench(fn) -> float:
    """Median milliseconds."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def max_ulps(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error in units of the output dtype's last place at |ref| (floored at rms(ref)/64)."""
    ulp = torch.finfo(y.dtype).eps * torch.maximum(ref.abs(), ref.pow(2).mean().sqrt() / 64)
    return float(((y.double() - ref).abs() / ulp).max())


def sweep_plans(ht, x: torch.Tensor, n: int, copy_ms: float, ref: torch.Tensor) -> list:
    rows = []
    cands = sorted(ht._factored_candidates(n, 2), key=lambda p: p.cost)
    seen, plans = set(), []
    for p in cands:
        key = (p.M0, p.D1, p.D2, p.BM)
        if key not in seen:
            seen.add(key)
            plans.append(p)
    plans = plans[:6]
    if n <= ht.DENSE_FALLBACK_MAX:
        plans.append(ht.plan(n, 2, "dense"))
    for p in plans:
        for warps in (4, 8):
            try:
                fn = lambda: ht.hadamard_transform_triton(x, plan_override=p, num_warps=warps)  # noqa: E731
                err = max_ulps(fn()[: ref.shape[0]], ref)
                ms = bench(fn)
                rows.append({"plan": f"{p.kind} M0={p.M0} D1={p.D1} D2={p.D2} BM={p.BM} BK={p.BK}",
                             "cost": round(p.cost, 1), "num_warps": warps, "ms": ms,
                             "x_copy": ms / copy_ms, "max_ulps": err})
            except Exception as e:  # noqa: BLE001 - a plan that does not compile is reported, not fatal
                rows.append({"plan": f"{p.kind} M0={p.M0} D1={p.D1} D2={p.D2} BM={p.BM}", "num_warps": warps,
                             "error": f"{type(e).__name__}: {str(e)[:200]}"})
    for r in rows:
        print("   sweep", json.dumps(r))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 4096, 14336, 18944])
    ap.add_argument("--sweep", action="store_true", help="also time every kernel plan")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hadamard_gpu.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from graphquant.kernels import hadamard_triton as ht

    dev = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "tokens": args.tokens, "dtype": "bfloat16",
              "target_x_copy": TARGET, "sizes": []}
    header = f"{'n':>6} {'m·2^k':>9} {'plan':>26} {'copy ms':>8} {'triton':>8} {'dense':>8} {'torch':>8} " \
             f"{'tri/copy':>8} {'dense/copy':>10} {'torch/copy':>10} {'GB/s tri':>8} {'ulps':>5}"
    print(header)
    for n in args.sizes:
        torch.manual_seed(n)
        x = torch.randn(args.tokens, n, device=dev, dtype=torch.bfloat16)
        m, k = H.factorize(n)
        p = ht.plan(n, 2)
        h_dense = H.hadamard_matrix(n, dtype=torch.bfloat16, device=dev)
        h_t = h_dense.T.contiguous()
        ref = x[:256].double() @ H.hadamard_matrix(n, dtype=torch.float64, device=dev).T

        methods = {
            "copy": lambda: x.clone(),
            "triton": lambda: torch.ops.graphquant.hadamard_transform(x, False),
            "dense": lambda: x @ h_t,
            "torch": lambda: H.hadamard_transform(x),
        }
        ulps = {name: max_ulps(fn()[:256], ref) for name, fn in methods.items() if name != "copy"}
        ms = {name: bench(fn) for name, fn in methods.items()}
        gbs = 2 * x.numel() * x.element_size() / (ms["triton"] * 1e-3) / 1e9
        row = {"n": n, "factorization": f"{m}·2^{k}",
               "plan": f"{p.kind} M0={p.M0} D1={p.D1} D2={p.D2} BM={p.BM}" if p.kind == "factored" else "dense",
               "ms": ms, "x_copy": {name: ms[name] / ms["copy"] for name in ms},
               "triton_GBps": gbs, "copy_GBps": 2 * x.numel() * 2 / (ms["copy"] * 1e-3) / 1e9,
               "max_ulps_vs_float64": ulps,
               "meets_target": (ms["triton"] / ms["copy"] <= TARGET) if n in (128, 4096, 14336) else None}
        print(f"{n:>6} {row['factorization']:>9} {row['plan'][:26]:>26} {ms['copy']:8.4f} {ms['triton']:8.4f} "
              f"{ms['dense']:8.4f} {ms['torch']:8.4f} {ms['triton'] / ms['copy']:8.2f} "
              f"{ms['dense'] / ms['copy']:10.2f} {ms['torch'] / ms['copy']:10.2f} {gbs:8.0f} {ulps['triton']:5.2f}",
              flush=True)
        if args.sweep:
            t0 = time.time()
            row["sweep"] = sweep_plans(ht, x, n, ms["copy"], ref)
            row["sweep_s"] = time.time() - t0
        result["sizes"].append(row)
        del x, h_dense, h_t
        torch.cuda.empty_cache()

    ok = all(r["max_ulps_vs_float64"]["triton"] <= 1.0 for r in result["sizes"])
    targets = [r["meets_target"] for r in result["sizes"] if r["meets_target"] is not None]
    result["correct"] = ok
    result["all_targets_met"] = all(targets) if targets else None
    print(f"triton within 1 ulp of float64 everywhere: {ok}; within {TARGET}x of copy for 128/4096/14336: "
          f"{result['all_targets_met']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
