"""QuaRot's R4 at prefill on the GPU: the persistent Hadamard (+ activation quantization) kernel's launch shapes.

    PYTHONPATH=. python benchmarks/r4_prefill_gpu.py [--rows 16384] [--n 14336] [--out ...]

On a (rows, n) bf16 tensor (Llama-3-8B's down-projection input for 8 x 2048 prompt tokens), CUDA-graph replayed
(``hadamard_gpu.bench_graph``, median ms), for each plan variant: the transform alone, and the fused transform +
quantization for fp8 / int8 codes under a static scale and a dynamic per-row one (``FAST_CODES`` as the library
sets it). Variants are the tuned plan with other launch shapes and with the sliced kernel
(``Plan.col_split``: ``H_N = H_2 ⊗ H_{N/2}``, the ``H_2`` part as an fp32 butterfly; ``Plan.row_split``:
row blocks one after the other). The recorded sweeps (``results/r4_prefill_gpu_sweep1.json``, ``_sweep2.json``,
``r4_prefill_gpu.json``) also timed versions of the sliced kernel that were not kept: four column slices
(``H_4 ⊗ H_32``), and dynamic codes through a workspace row or a second launch ("dyn ws", "dyn 2L"). Checks in the same run: the transform's largest error against float64 on the
first 64 rows (units of bf16's last place), how many of those outputs differ from the tuned plan's, and that
each fused kernel gives the codes and scales of ``quantize_rows`` applied to the same plan's transform.
Writes ``benchmarks/results/r4_prefill_gpu.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from generate_gpu import write_json  # noqa: E402
from hadamard_gpu import bench_graph, max_ulps  # noqa: E402

#: (col_split, row_split, num_warps, ctas, stages[, maxnreg])
VARIANTS = ((1, 1, 4, 2, 1), (1, 2, 4, 2, 1), (2, 1, 4, 2, 1), (2, 2, 4, 2, 1), (2, 2, 4, 2, 2), (2, 1, 8, 1, 2))
#: (name, fp8, static); static "exact": without the scale's multiplier (``hadamard_triton.STATIC_MULTIPLIER`` off)
MODES = (("transform", None, None), ("fp8 static", True, True), ("fp8 static exact", True, True),
         ("int8 static", False, True), ("int8 static exact", False, True),
         ("fp8 dynamic", True, False), ("int8 dynamic", False, False))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--variants", default="", help="';'-separated cs,rh,warps,ctas,stages (default: VARIANTS)")
    ap.add_argument("--budget-s", type=float, default=400.0, help="start no new variant after this many seconds")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "r4_prefill_gpu.json"))
    args = ap.parse_args(argv)
    try:
        variants = [tuple(int(v) for v in s.split(",")) for s in args.variants.split(";")] if args.variants \
            else VARIANTS
    except ValueError:
        variants = [()]
    if any(len(v) not in (5, 6) for v in variants):
        raise SystemExit(f"r4_prefill_gpu.py: --variants takes ';'-separated cs,rh,warps,ctas,stages[,maxnreg] "
                         f"integers, e.g. 2,2,4,2,2 or 2,2,4,3,2,168; got {args.variants!r}")
    if not torch.cuda.is_available():
        raise SystemExit("r4_prefill_gpu.py needs a CUDA GPU")
    from graphquant import hadamard as H
    from graphquant.kernels import hadamard_triton as HT
    from graphquant.kernels import quant_triton as QT

    torch.manual_seed(0)
    x = torch.randn(args.rows, args.n, device="cuda", dtype=torch.bfloat16)
    ref = x[:64].double() @ H.hadamard_matrix(args.n, dtype=torch.float64, device="cuda").T
    base = HT.plan(args.n, 2)
    copy_ms = bench_graph(lambda: x.clone())
    want = HT.hadamard_transform_triton(x[:64], plan_override=base)
    s = torch.tensor(0.05, device="cuda")
    rows, t0 = [], time.time()
    print(f"{args.rows} x {args.n} bf16, tuned plan {base.describe()}; copy {copy_ms * 1e3:.1f} us; ms per call, "
          "graph-replayed")
    print(f"{'plan':40s} " + " ".join(f"{m[0]:>12s}" for m in MODES) + "  ulps  differ  same codes")
    for cs, rh, w, ctas, st, *reg in variants:
        if time.time() - t0 > args.budget_s:
            print("budget spent: later variants not timed")
            break
        p = dataclasses.replace(base, col_split=cs, row_split=rh, num_warps=w, ctas=ctas, stages=st,
                                maxnreg=reg[0] if reg else 0)
        row = {"plan": p.describe(), "col_split": cs, "row_split": rh, "num_warps": w, "ctas": ctas, "stages": st,
               "maxnreg": p.maxnreg, "ms": {}, "same_codes": True}
        try:
            y = HT.hadamard_transform_triton(x, plan_override=p)
            row["max_ulps_vs_float64"] = max_ulps(y[:64], ref)
            row["differ_from_tuned_plan"] = int((y[:64] != want).sum())
            for name, fp8, static in MODES:
                if fp8 is None:
                    row["ms"][name] = bench_graph(lambda: HT.hadamard_transform_triton(x, plan_override=p))
                    continue
                sc = s if static else None
                HT.STATIC_MULTIPLIER = not name.endswith("exact")
                try:
                    q, qs = HT.hadamard_quantize(x, fp8, sc, plan_override=p)
                    wq, ws = QT.quantize_rows(y, fp8, sc)
                    row["same_codes"] &= torch.equal(q.view(torch.int8), wq.view(torch.int8)) and (
                        static or torch.equal(qs, ws))
                    del q, qs, wq, ws
                    row["ms"][name] = bench_graph(lambda: HT.hadamard_quantize(x, fp8, sc, plan_override=p))
                finally:
                    HT.STATIC_MULTIPLIER = True
            del y
        except Exception as e:  # noqa: BLE001 - a launch shape that does not build is reported
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        times = " ".join(f"{row['ms'].get(m[0], float('nan')):12.4f}" for m in MODES)
        print(f"{row['plan']:40s} {times}  {row.get('max_ulps_vs_float64', float('nan')):4.2f} "
              f"{row.get('differ_from_tuned_plan', -1):7d}  {row['same_codes']}"
              + (f"  {row['error']}" if "error" in row else ""), flush=True)
    best = {m[0]: min(((r["ms"][m[0]], r["plan"]) for r in rows if m[0] in r["ms"]), default=(None, None))
            for m in MODES}
    for m, (ms, plan) in best.items():
        print(f"best {m}: {plan} {ms}")
    write_json(args.out, {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                          "triton": __import__("triton").__version__, "rows": args.rows, "n": args.n,
                          "tuned_plan": base.describe(), "copy_ms": copy_ms, "variants": rows, "best": best})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
