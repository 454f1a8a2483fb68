"""Hadamard transform speed on a CUDA GPU: Triton kernel vs dense matmul vs torch fallback vs copy.

    python benchmarks/hadamard_gpu.py [--tokens 8192] [--sizes 128 4096 14336 18944] [--sweep] [--quantize]

For each order n, on an (tokens, n) bf16 tensor: the Triton transform (``graphquant::hadamard_transform``
on CUDA), a dense ``x @ Hᵀ`` in bf16 (cuBLAS), the torch fallback (``graphquant.hadamard.hadamard_transform``,
O(n log n) in float32) and a plain ``x.clone()``. Median times from ``triton.testing.do_bench``;
ratios are to the copy. Correctness of every method is checked against float64 on a slice of the
rows in the same run. Times are medians of eager calls (Python dispatch included) and, for the copy and
the Triton kernel, of CUDA-graph replays (GPU time alone; the target is judged on these).
``--sweep`` also times other kernel plans (tilings, exact or fast intermediates) for each n.
``--quantize`` also times QuaRot's R4 with its activation quantization (int8 / fp8, dynamic per row and static),
graph-replayed, as the fused ``hadamard_quantize`` kernel and as the two kernels it replaces (the transform,
then ``quantize_rows``), and checks both give the same codes and scales: which of the two
``activation.FUSED_MIN_ROWS`` should pick at ``--tokens`` rows (prefill: 16384 x 14336 for 8 x 2048
Llama-3-8B prompts).
Writes ``benchmarks/results/hadamard_gpu.json``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from graphquant import hadamard as H  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from generate_gpu import write_json  # noqa: E402

TARGET = 1.5  # the Triton transform should be within 1.5× of a copy (n = 128, 4096, 14336)


def bench(fn) -> float:
    """Median milliseconds of eager calls (includes Python and launch overhead)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def bench_graph(fn) -> float:
    """Median milliseconds per call replayed from a CUDA graph: the GPU time alone."""
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def max_ulps(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error in units of the output dtype's last place at |ref| (floored at rms(ref)/16)."""
    ulp = torch.finfo(y.dtype).eps * torch.maximum(ref.abs(), ref.pow(2).mean().sqrt() / 16)
    return float(((y.double() - ref).abs() / ulp).max())


def sweep_candidates(ht, n: int, tokens: int = 8192) -> list:
    """A manageable subset of plans: the persistent kernels with a few launch shapes, the best
    tiled ones for reference, and one plan with fast (bf16-rounded) intermediates for information."""
    import dataclasses as dc

    if n <= 128:
        dense = ht.plan(n, 2, "dense")
        plans = [dc.replace(dense, persistent=False)]
        plans += [dc.replace(dense, persistent=True, BR=br, stages=st) for br in (32, 64, 128) for st in (1, 2)]
        return plans
    exact = sorted(ht.candidates(n, 2), key=ht._score)
    persistent = list(dict.fromkeys(dc.replace(p, ctas=4, stages=1, num_warps=4) for p in exact if p.persistent))
    tiled = [p for p in exact if not p.persistent]
    structures = persistent[:3] + [p for p in persistent[3:] if p.D1 == 1][:1]
    plans = []
    for p in structures:
        for ctas, stages, warps in ((2, 1, 4), (4, 2, 4), (1, 1, 8)):
            plans.append(dc.replace(p, ctas=ctas, stages=stages, num_warps=warps))
    plans += [dc.replace(p, num_warps=4) for p in tiled[:2]] if persistent else tiled[:6]
    fast = sorted((p for p in ht.candidates(n, 1) if p.persistent), key=ht._score)
    if fast:
        plans.append(dc.replace(fast[0], ctas=2, stages=1, num_warps=4))
    if tokens <= 64:
        plans += few_row_plans(ht, n)
    return list(dict.fromkeys(plans))


def sweep_plans(ht, x: torch.Tensor, n: int, copy_ms: float, ref: torch.Tensor) -> list:
    rows = []
    for p in sweep_candidates(ht, n, x.shape[0]):
        try:
            fn = lambda: ht.hadamard_transform_triton(x, plan_override=p)  # noqa: E731
            err = max_ulps(fn()[: ref.shape[0]], ref)
            ms = bench_graph(fn)
            rows.append({"plan": p.describe(), "score": round(ht._score(p), 1), "ms": ms,
                         "x_copy": ms / copy_ms, "max_ulps": err})
        except Exception as e:  # noqa: BLE001 - a plan that does not compile is reported, not fatal
            rows.append({"plan": p.describe(), "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print("   sweep", json.dumps(rows[-1]), flush=True)
    return rows


#: launch shapes of the fused kernel timed by ``--quantize`` besides the plan's own: (programs per SM, pipeline
#: stages, warps). Its quantization epilogue runs after the products, with few warps per SM it is not hidden
FUSED_LAUNCHES = ((1, 1, 8), (2, 1, 8), (4, 2, 4), (1, 2, 8))


def few_row_plans(ht, n: int) -> list:
    """Tiled (non-persistent) plans of the tuned structure with every row-block size: for a few rows (decode)
    they split one row over ``NT`` programs, where the persistent kernel gives a whole row to one."""
    import dataclasses as dc

    p = ht.plan(n, 2)
    if p is None or p.kind != "factored":
        return []
    same = [c for c in ht.candidates(n, 2) if not c.persistent and (c.M0, c.D1, c.D2) == (p.M0, p.D1, p.D2)]
    return list(dict.fromkeys(dc.replace(c, num_warps=w) for c in same for w in (2, 4) if c.BM <= 64))


def _times(table: dict) -> str:
    """``plan 12.3us, ...`` (or ``plan FAILED why``) for one row of ``fused_vs_two_kernels``."""
    return ", ".join(f"{k} {v * 1e3:.1f}us" if isinstance(v, float) else f"{k} FAILED {v}" for k, v in table.items())


def fused_vs_two_kernels(ht, x: torch.Tensor, fast_codes=(True,)) -> list:
    """R4 + activation quantization of ``x``: graph-replayed ms of ``hadamard_quantize`` (one kernel, its plan's
    launch shape and the ``FUSED_LAUNCHES``; at up to ``FEW_ROWS`` rows also the tiled
    kernel with the quantization in its epilogue) and of the transform then ``quantize_rows`` (two; the transform
    with its plan and, for up to 64 rows, the ``few_row_plans``), for int8 / fp8 codes, dynamic per row and
    static; codes and scales must be equal everywhere. Each of ``fast_codes`` sets ``quant_triton.FAST_CODES`` for
    the timed kernels (the reference codes are always computed without it); its value is restored afterwards."""
    import dataclasses as dc

    from graphquant.kernels import quant_triton as QT

    rows = []
    n = x.shape[-1]
    if not ht.fusable(n, x.dtype):
        return [{"error": f"no fused kernel for order {n}"}]
    base = ht.plan(n, 2)
    fused_plans = [base] + [dc.replace(base, ctas=c, stages=st, num_warps=w) for c, st, w in FUSED_LAUNCHES]
    two_plans = [base] + (few_row_plans(ht, n) if x.shape[0] <= 64 else [])
    default_fast = QT.FAST_CODES
    for fast, fp8, static in itertools.product(fast_codes, (False, True), (False, True)):
        s = torch.tensor(0.05, device=x.device) if static else None
        # at few rows: also the tiled kernel with the quantization in its epilogue
        tiled = [ht.few_rows_plan(base)] if ht._few_rows_tiled(base, x.shape[0]) else []
        QT.FAST_CODES = False
        want_q, want_s = QT.quantize_rows(ht.hadamard_transform_triton(x), fp8, s)
        QT.FAST_CODES = fast
        row = {"codes": "fp8" if fp8 else "int8", "scale": "static" if static else "dynamic",
               "fast_codes": fast, "fused": {}, "two_kernels": {}, "same_codes": True}

        def timed(fn, table, name):
            try:
                q, sc = fn()
                same = torch.equal(q.view(torch.int8), want_q.view(torch.int8))
                row["same_codes"] &= same and (static or torch.equal(sc, want_s))
                table[name] = bench_graph(fn)
            except Exception as e:  # noqa: BLE001 - a launch shape that does not compile is reported
                table[name] = f"{type(e).__name__}: {str(e)[:160]}"

        for p in fused_plans + tiled:
            timed(lambda p=p: ht.hadamard_quantize(x, fp8, s, plan_override=p), row["fused"], p.describe())
        for p in two_plans:
            timed(lambda p=p: QT.quantize_rows(ht.hadamard_transform_triton(x, plan_override=p), fp8, s),
                  row["two_kernels"], p.describe())
        best = {k: min(((v, name) for name, v in row[k].items() if isinstance(v, float)), default=(None, None))
                for k in ("fused", "two_kernels")}
        row["fused_ms"], row["fused_best"] = best["fused"]
        row["two_kernels_ms"], row["two_kernels_best"] = best["two_kernels"]
        row["fused_over_two"] = (row["fused_ms"] / row["two_kernels_ms"]
                                 if row["fused_ms"] and row["two_kernels_ms"] else None)
        rows.append(row)
        QT.FAST_CODES = default_fast
        print(f"   R4 + {row['codes']:4s} {row['scale']:7s}{' FAST_CODES' if fast else ''} ({x.shape[0]} rows): "
              f"fused {_times(row['fused'])}",
              flush=True)
        print(f"        two kernels: {_times(row['two_kernels'])}; best fused / best two = "
              f"{row['fused_over_two'] or float('nan'):.2f}, same codes: {row['same_codes']}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 4096, 14336, 18944])
    ap.add_argument("--sweep", action="store_true", help="also time every kernel plan")
    ap.add_argument("--quantize", action="store_true",
                    help="also time the fused Hadamard + quantization kernel against the transform + quantize_rows")
    ap.add_argument("--fast-codes", choices=("off", "on", "both"), default="on",
                    help="--quantize with quant_triton.FAST_CODES off, on (the library default), or both "
                         "(an A/B in one run)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hadamard_gpu.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from graphquant.kernels import hadamard_triton as ht

    dev = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "tokens": args.tokens, "dtype": "bfloat16",
              "target_x_copy": TARGET, "sizes": []}
    header = (f"{'n':>6} {'m·2^k':>9} {'plan':>24} {'copy':>7} {'triton':>7} {'dense':>7} {'torch':>7} "
              f"{'tri/copy':>8} {'dense/copy':>10} {'torch/copy':>10} | {'graph: copy':>11} {'triton':>7} "
              f"{'tri/copy':>8} {'GB/s':>5} | {'ulps':>4}")
    print("milliseconds, median; eager = one Python call each (op dispatch included); graph = CUDA-graph replay")
    print(header)
    for n in args.sizes:
        torch.manual_seed(n)
        x = torch.randn(args.tokens, n, device=dev, dtype=torch.bfloat16)
        m, k = H.factorize(n)
        p = ht.plan(n, 2)
        h_t = H.hadamard_matrix(n, dtype=torch.bfloat16, device=dev).T.contiguous()
        ref = x[:256].double() @ H.hadamard_matrix(n, dtype=torch.float64, device=dev).T

        methods = {
            "copy": lambda: x.clone(),
            "triton": lambda: torch.ops.graphquant.hadamard_transform(x, False),
            "dense": lambda: x @ h_t,
            "torch": lambda: H.hadamard_transform(x),
        }
        ulps = {name: max_ulps(fn()[:256], ref) for name, fn in methods.items() if name != "copy"}
        ms = {name: bench(fn) for name, fn in methods.items()}
        graph = {"copy": bench_graph(methods["copy"]),
                 "triton": bench_graph(lambda: ht.hadamard_transform_triton(x))}
        gbs = 2 * x.numel() * x.element_size() / (graph["triton"] * 1e-3) / 1e9
        ratio = graph["triton"] / graph["copy"]
        row = {"n": n, "factorization": f"{m}·2^{k}", "plan": p.describe(),
               "ms_eager": ms, "x_copy_eager": {name: ms[name] / ms["copy"] for name in ms},
               "ms_graph": graph, "x_copy_graph": ratio,
               "triton_GBps": gbs, "copy_GBps": 2 * x.numel() * 2 / (graph["copy"] * 1e-3) / 1e9,
               "max_ulps_vs_float64": ulps,
               "meets_target": (ratio <= TARGET) if n in (128, 4096, 14336) else None}
        print(f"{n:>6} {row['factorization']:>9} {row['plan'][:24]:>24} {ms['copy']:7.4f} {ms['triton']:7.4f} "
              f"{ms['dense']:7.4f} {ms['torch']:7.4f} {ms['triton'] / ms['copy']:8.2f} "
              f"{ms['dense'] / ms['copy']:10.2f} {ms['torch'] / ms['copy']:10.2f} | {graph['copy']:11.4f} "
              f"{graph['triton']:7.4f} {ratio:8.2f} {gbs:5.0f} | {ulps['triton']:4.2f}", flush=True)
        if args.quantize:
            fast = {"off": (False,), "on": (True,), "both": (False, True)}[args.fast_codes]
            row["quantize"] = fused_vs_two_kernels(ht, x, fast)
        if args.sweep:
            t0 = time.time()
            row["sweep"] = sweep_plans(ht, x, n, graph["copy"], ref)
            row["sweep_s"] = time.time() - t0
        result["sizes"].append(row)
        del x, h_t
        torch.cuda.empty_cache()

    ok = all(r["max_ulps_vs_float64"]["triton"] <= 1.0 for r in result["sizes"]) \
        and all(q.get("same_codes", True) for r in result["sizes"] for q in r.get("quantize", []))
    targets = [r["meets_target"] for r in result["sizes"] if r["meets_target"] is not None]
    result["correct"] = ok
    result["all_targets_met"] = all(targets) if targets else None
    print(f"triton within 1 ulp of float64 everywhere: {ok}; GPU time within {TARGET}x of a copy for "
          f"128/4096/14336: {result['all_targets_met']}")
    out = Path(args.out)
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
