"""CPU lowering: end-to-end forward time of gq-llama-20m (1x512 tokens) in float, fake-quant,
``lower=True`` (the CPU policy: a kernel only where it measured faster, never fp8) and
``lower="all"`` (every kernel), plus the per-op timings behind the policy's decisions.

Usage::

    python benchmarks/cpu_lowering.py                       # ../shared/data/models/gq-llama-20m
    python benchmarks/cpu_lowering.py --model PATH --tokens 512 --reps 5

Prints a table and writes ``benchmarks/results/cpu_lowering.json`` and ``cpu_lowering.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import torch  # noqa: E402

SCHEMES = ["w_int8_per_channel_a_int8_per_token", "w_uint4_per_group_asym", "w_fp8_a_fp8"]


def _times(fns: dict, reps: int) -> dict:
    """Best-of-``reps`` forward time (ms) of each function, run round-robin so that every variant sees
    the same background load (the CPU may be shared)."""
    best = {k: float("inf") for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(reps):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
    return {k: round(v * 1e3, 1) for k, v in best.items()}


def main() -> None:
    import graphquant as gq
    from graphquant.config import preset
    from graphquant.datasets import shared_dir
    from graphquant.models.hf import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--schemes", nargs="*", default=SCHEMES)
    args = ap.parse_args()
    path = args.model or (str(shared_dir() / "data" / "models" / "gq-llama-20m") if shared_dir() else None)
    if path is None or not Path(path).exists():
        sys.exit("no model: pass --model PATH (default ../shared/data/models/gq-llama-20m)")
    model, _ = load_model(path)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, vocab, (4, 128), generator=g) for _ in range(2)]
    x = torch.randint(0, vocab, (1, args.tokens), generator=g)
    rows = []
    for scheme in args.schemes:
        cfg = dataclasses.replace(preset(scheme), exclude=["*lm_head"])
        models = {}
        for mode, key in ((False, "fake_quant"), (True, "lower_auto"), ("all", "lower_all")):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                models[key] = gq.quantize(model, cfg, calib, progress=False, check=False, lower=mode)
        fns = {"float": lambda: model(input_ids=x, use_cache=False)}
        fns.update({k: (lambda m=m: m(input_ids=x)) for k, m in models.items()})
        t = _times(fns, args.reps)
        low = models["lower_auto"].lowering
        row = {"scheme": scheme, **{f"{k}_ms": v for k, v in t.items()}, "auto_lowered": len(low["lowered"]),
               "auto_fake_quant": len(low["fake_quant"]), "cpu_timings": low["cpu_timings"]}
        print(f"{scheme:40s} " + "  ".join(f"{k} {v:.1f} ms" for k, v in t.items()), flush=True)
        rows.append(row)
        del models
    load = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    meta = {"load_average_1_5_15min": load, "model": path, "tokens": args.tokens, "reps": args.reps,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "cpu_lowering.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"gq-llama-20m forward, 1x{args.tokens} tokens, CPU ({meta['threads']} threads, torch {meta['torch']}),"
             f" best of {args.reps} (variants timed round-robin); lm_head in float; load average at the end "
             f"{load} (on a shared machine end-to-end times are noisy; per-op timings are interleaved too)", "",
             "| scheme | float | fake-quant | lower=True (auto) | lower=\"all\" | auto: lowered / kept fake |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['scheme']}` | {r['float_ms']} ms | {r['fake_quant_ms']} ms | {r['lower_auto_ms']} ms | "
                     f"{r['lower_all_ms']} ms | {r['auto_lowered']} / {r['auto_fake_quant']} |")
    lines += ["", "Per-op timings behind lower=True (kernel vs fake-quant Linear, 256 tokens):", "",
              "| scheme | kernel | N x K | kernel ms | fake-quant ms | lowered |", "|---|---|---|---|---|---|"]
    for r in rows:
        for t in r["cpu_timings"]:
            lines.append(f"| `{r['scheme']}` | {t['kernel']} | {t['shape'][0]} x {t['shape'][1]} | {t['kernel_ms']} | "
                         f"{t['fake_quant_ms']} | {'yes' if t['lowered'] else 'no'} |")
    (out / "cpu_lowering.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
