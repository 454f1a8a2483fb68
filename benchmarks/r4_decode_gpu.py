"""QuaRot's online R4 at decode (one or 16 rows of 14336, Llama-3-8B's down projection input) on a CUDA GPU:
the tiled factored Hadamard kernel's launch choices, graph-replayed.

    python benchmarks/r4_decode_gpu.py [--rows 1 16] [--out benchmarks/results/r4_decode_gpu.json]

For each choice of ``hadamard_triton.SYLVESTER_LOADED`` (0, 1), ``FEW_ROWS_WARPS`` (4, 8) and ``FEW_ROWS_BK``
(128; 0 is the plan's 32) it times
the kernels a decode step runs for R4: ``hadamard_pieces`` (W4A16 on ``w4_i8mma``: the transform with the int8
pieces in its epilogue; one row), ``hadamard_quantize`` with a static fp8 / int8 scale (one launch) and with a
dynamic one (two), and the plain transform (W8A16). Beside them, for scale: the pieces launch alone (plain and
gated, ``int8_pieces_kernel``) and a copy of the row. Every choice's outputs are compared bit for bit with the
first choice's. Times: ``triton.testing.do_bench_cudagraph`` means in microseconds (a
CUDA graph of repeated calls: kernel time plus the gaps between launches, no Python). Writes the JSON with a
``rows`` list and prints a table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

N = 14336
GROUP = 128


def _bench(fn) -> float:
    import triton

    return float(triton.testing.do_bench_cudagraph(fn, rep=200)) * 1000.0


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return all(_same(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    return torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a, b.view(torch.uint8)
                       if b.dtype.itemsize == 1 else b)


def _cases(rows: int, x: torch.Tensor, pair: torch.Tensor):
    from graphquant.kernels import hadamard_triton as HT
    from graphquant.kernels import quant_triton as QT

    s8 = torch.tensor([0.02], device=x.device)
    sf = torch.tensor([0.004], device=x.device)
    cases = {
        "fp8 static": lambda: HT.hadamard_quantize(x, True, sf),
        "int8 static": lambda: HT.hadamard_quantize(x, False, s8),
        "fp8 dynamic": lambda: HT.hadamard_quantize(x, True),
        "int8 dynamic": lambda: HT.hadamard_quantize(x, False),
        "transform": lambda: HT.hadamard_transform_triton(x),
    }
    if rows == 1:
        cases = {"pieces (W4A16)": lambda: HT.hadamard_pieces(x, GROUP), **cases}
    steps = N // (GROUP * 4)
    P = torch.empty((steps, 16, GROUP * 4), device=x.device, dtype=torch.int8)
    RS = torch.empty((steps, 16), device=x.device, dtype=torch.float32)
    XS = torch.empty((steps, 16), device=x.device, dtype=torch.float32)

    def pieces(a, gated):
        QT.int8_pieces_kernel[(steps,)](a, P, RS, XS, rows, a.stride(0), N, GROUP=GROUP, GPS=4, GATED=gated,
                                        num_warps=4)
        return P
    reference = {"copy of the row": lambda: x.clone()}
    if rows == 1:
        reference["pieces launch alone"] = lambda: pieces(x, False)
        reference["gated pieces launch alone"] = lambda: pieces(pair, True)
    return cases, reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--bk", type=int, nargs="+", default=[128], help="0: the plan's BK")
    ap.add_argument("--loaded", type=int, nargs="+", default=[0, 1],
                    help="hadamard_triton.SYLVESTER_LOADED: stage 2's Sylvester matrix built in registers (0) or read "
                         "from memory (1)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "r4_decode_gpu.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("r4_decode_gpu.py needs a CUDA GPU")
    from generate_gpu import write_json
    from graphquant.kernels import hadamard_triton as HT

    torch.manual_seed(0)
    rows_out = []
    defaults = HT.FEW_ROWS_WARPS, HT.FEW_ROWS_BK, HT.SYLVESTER_LOADED
    for rows in args.rows:
        x = torch.randn(rows, N, device="cuda", dtype=torch.bfloat16)
        pair = torch.randn(rows, 2 * N, device="cuda", dtype=torch.bfloat16)
        cases, reference = _cases(rows, x, pair)
        for name, fn in reference.items():
            rows_out.append({"rows": rows, "kernel": name, "config": "-", "us": _bench(fn)})
        base = {}
        for loaded, warps, bk in itertools.product(args.loaded, args.warps, args.bk):
            HT.FEW_ROWS_WARPS, HT.FEW_ROWS_BK, HT.SYLVESTER_LOADED = warps, (bk or None), bool(loaded)
            cfg = f"w{warps} BK{bk or HT.plan(N, 2).BK}{' H' if loaded else ''}"
            for name, fn in cases.items():
                row = {"rows": rows, "kernel": name, "config": cfg}
                try:
                    out = fn()
                    torch.cuda.synchronize()
                    if name not in base:
                        base[name] = out
                    row["same_as_default"] = _same(out, base[name])
                    row["us"] = _bench(fn)
                except Exception as e:  # noqa: BLE001 - a choice that does not compile is a result
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows_out.append(row)
        HT.FEW_ROWS_WARPS, HT.FEW_ROWS_BK, HT.SYLVESTER_LOADED = defaults
    print(f"{'rows':>4} {'kernel':28} {'config':12} {'us':>7}  same")
    for r in rows_out:
        us = f"{r['us']:7.2f}" if "us" in r else "  error"
        print(f"{r['rows']:>4} {r['kernel']:28} {r['config']:12} {us}  {r.get('same_as_default', '')} "
              f"{r.get('error', '')}")
    write_json(Path(args.out), {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                "n": N, "group": GROUP, "rows": rows_out})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
