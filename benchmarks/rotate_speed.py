"""Time of the offline rewrites (fuse_norms + R1 + R2) for a Llama-shaped model of random init.

On a GPU: the Llama-3-8B shape (target: under 20 s on an H200), plus 2- and 4-layer cuts to show
the time is linear in the parameter count. On CPU: a 1B shape (TinyLlama-1.1B) and cuts.
Capture (torch.export) time is reported separately from the rewrite itself.

    python benchmarks/rotate_speed.py [--device cuda] [--shape 8b|1b] [--layers 32,16,8]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graphquant as gq  # noqa: E402
from graphquant.api import run_pipeline  # noqa: E402
from graphquant.capture import capture  # noqa: E402
from graphquant.config import QuaRotConfig  # noqa: E402
from graphquant.passes import PassContext  # noqa: E402
from graphquant.patterns.report import analyze_graph  # noqa: E402
from graphquant.plan import make_plan  # noqa: E402

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, num_hidden_layers=32),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
               vocab_size=32000, num_hidden_layers=22),
}


def build(shape: str, layers: int, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**SHAPES[shape], "num_hidden_layers": layers}, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(shape: str, layers: int, device: str, dtype: torch.dtype) -> dict:
    model = build(shape, layers, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    sync(device)
    t0 = time.perf_counter()
    captured = capture(model, None)
    report = analyze_graph(captured)
    sync(device)
    t1 = time.perf_counter()
    plan = make_plan(report, [QuaRotConfig(r3=False, r4=False)])
    ctx = PassContext(captured, report, plan)
    run_pipeline(ctx, plan.passes(), check=True)
    sync(device)
    t2 = time.perf_counter()
    out = {"shape": shape, "layers": layers, "params": params, "device": device, "dtype": str(dtype),
           "capture_analyze_s": t1 - t0, "rewrite_s": t2 - t1, "passes": plan.passes(),
           "rewrite_s_per_billion_params": (t2 - t1) / (params / 1e9)}
    del model, captured, ctx
    if device.startswith("cuda"):
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default=None, choices=list(SHAPES))
    ap.add_argument("--layers", default=None, help="comma-separated layer counts")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args(argv)
    shape = args.shape or ("8b" if args.device.startswith("cuda") else "1b")
    full = SHAPES[shape]["num_hidden_layers"]
    layers = [int(x) for x in args.layers.split(",")] if args.layers else [full, full // 2, full // 4]
    dtype = getattr(torch, args.dtype)
    rows = [measure(shape, n, args.device, dtype) for n in layers]
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"fuse_norms + R1 + R2 (Hadamard), {shape} Llama shape, {args.dtype}, {dev}, torch {torch.__version__}")
    print(f"{'layers':>6} {'params (B)':>10} {'capture+analyze s':>18} {'rewrite s':>10} {'s / B params':>12}")
    for r in rows:
        print(f"{r['layers']:>6} {r['params'] / 1e9:>10.2f} {r['capture_analyze_s']:>18.2f} {r['rewrite_s']:>10.2f} "
              f"{r['rewrite_s_per_billion_params']:>12.2f}")
    if shape == "8b" and rows[0]["layers"] == 32:
        r = rows[0]
        total = r["rewrite_s"] + r["capture_analyze_s"]
        print(f"target: 8B rewrite under 20 s -> {'PASS' if r['rewrite_s'] < 20 else 'MISS'} "
              f"(rewrite {r['rewrite_s']:.1f} s; with capture {total:.1f} s)")
    out = ROOT / "benchmarks" / "results" / f"rotate_speed_{shape}_{'gpu' if args.device.startswith('cuda') else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": dev, "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
