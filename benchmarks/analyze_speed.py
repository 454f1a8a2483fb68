"""Capture and analysis speed and memory on a 1B-parameter-shaped Llama (random init, CPU).

Default shape is TinyLlama-1.1B's: hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 kv heads,
vocab 32000 (1.1 B parameters, 2.2 GB in bf16). The script measures, separately:

- model build (random init),
- capture (non-strict ``torch.export`` with dynamic batch/sequence),
- analysis (the pattern families over the captured graph) and rendering the summary,

and the peak resident memory during capture and during analysis. ``torch.export`` traces with fake
tensors and the captured module shares the model's parameters, so neither step should materialize
weight copies: the peak RSS growth must be a small fraction of the parameter bytes (``--max-ratio``,
default 0.25 beyond a fixed 128 MB allowance; the script exits with status 1 when it is exceeded). Peak RSS is read from
``/proc/self/status`` (VmHWM), reset before each step through ``/proc/self/clear_refs``; where that is
not possible the process-lifetime ``ru_maxrss`` is used. (``tracemalloc`` does not see tensor memory.)

Usage::

    python benchmarks/analyze_speed.py                      # full 1.1B shape (~3 GB RSS, about a minute)
    python benchmarks/analyze_speed.py --layers 2 --hidden 256   # quick run

Results are printed as a table and written to ``benchmarks/results/analyze_speed.json`` (other shapes:
``analyze_speed_<layers>L_<hidden>h.json``, or ``--out FILE``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import torch  # noqa: E402

DEFAULT = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)


# --- memory probes: graphquant.memory's -----------------------------------------------------------
from graphquant.memory import peak_rss_bytes as peak_bytes  # noqa: E402
from graphquant.memory import reset_peak_rss as reset_peak  # noqa: E402
from graphquant.memory import rss_bytes  # noqa: E402


class Step:
    """Times a step and records RSS before, peak during and RSS after."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        gc.collect()
        self.resettable = reset_peak()
        self.rss_before = rss_bytes()
        self.peak_floor = peak_bytes()  # only meaningful when the counter could not be reset
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.peak = peak_bytes()
        self.rss_after = rss_bytes()
        if self.resettable:
            self.peak_growth = max(0, self.peak - self.rss_before)
        else:  # lifetime maximum: growth is visible only above the earlier peak
            self.peak_growth = max(0, self.peak - max(self.peak_floor, self.rss_before))
        return False

    def row(self) -> dict:
        return {"seconds": round(self.seconds, 3), "rss_before_mb": mb(self.rss_before), "peak_mb": mb(self.peak),
                "rss_after_mb": mb(self.rss_after), "peak_growth_mb": mb(self.peak_growth)}


def mb(n: int) -> float:
    return round(n / 2**20, 1)


# --- model -----------------------------------------------------------------------------------------
def build_config(a):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                       max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5)


def param_bytes(model: torch.nn.Module) -> tuple[int, int]:
    seen, total, count = set(), 0, 0
    for p in list(model.parameters()) + list(model.buffers()):
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
        count += p.numel() if p.is_floating_point() and isinstance(p, torch.nn.Parameter) else 0
    return total, count


def shared_weights(model: torch.nn.Module, captured) -> tuple[int, int]:
    """How many of the captured graph's parameters are the model's own tensors (same storage)."""
    by_name = dict(model.named_parameters(remove_duplicate=False))
    shared = total = 0
    for target, names in captured.param_aliases.items():
        p = by_name.get(names[0])
        if p is None:
            continue
        total += 1
        shared += int(captured.param(target).data_ptr() == p.data_ptr())
    return shared, total


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=DEFAULT["layers"])
    ap.add_argument("--hidden", type=int, default=DEFAULT["hidden"])
    ap.add_argument("--intermediate", type=int, default=None, help="default: 2.75 x hidden (5632 for 2048)")
    ap.add_argument("--heads", type=int, default=None, help="default: hidden / 64")
    ap.add_argument("--kv-heads", type=int, default=None, help="default: heads / 8")
    ap.add_argument("--vocab", type=int, default=DEFAULT["vocab"])
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--max-ratio", type=float, default=0.25,
                    help="fail when (peak RSS growth - slack) / parameter bytes exceeds this (a copy is 1.0)")
    ap.add_argument("--slack-mb", type=float, default=128.0,
                    help="fixed allowance for the graph's own Python objects, independent of weight size")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the warm-up capture of a tiny model (then one-time code loading is measured too)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.intermediate is None:
        a.intermediate = DEFAULT["intermediate"] if a.hidden == DEFAULT["hidden"] else int(round(a.hidden * 2.75 / 64)) * 64
    if a.heads is None:
        a.heads = max(1, a.hidden // 64)
    if a.kv_heads is None:
        a.kv_heads = max(1, a.heads // 8)
    if a.out is None:
        shape = dict(hidden=a.hidden, intermediate=a.intermediate, layers=a.layers, heads=a.heads,
                     kv_heads=a.kv_heads, vocab=a.vocab)
        name = "analyze_speed.json" if shape == DEFAULT else f"analyze_speed_{a.layers}L_{a.hidden}h.json"
        a.out = HERE / "results" / name
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    import transformers

    import graphquant as gq
    from graphquant.patterns.report import analyze_graph

    dtype = getattr(torch, a.dtype)
    cfg = build_config(a)
    process_start_rss = rss_bytes()
    if not a.no_warmup:  # load torch.export's code paths once, so the steps below measure the model only
        from graphquant.models.tiny import tiny_model

        analyze_graph(gq.capture(tiny_model("llama", num_layers=1)))

    with Step("build") as build:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    pbytes, nparams = param_bytes(model)
    assert next(model.parameters()).dtype == dtype

    with Step("capture") as cap:
        captured = gq.capture(model)
    with Step("analyze") as ana:
        report = analyze_graph(captured)
    with Step("render") as ren:
        summary = report.summary()
        report.to_json()
    shared, total = shared_weights(model, captured)

    growth = max(cap.peak_growth, ana.peak_growth, ren.peak_growth)
    ratio = growth / pbytes
    ok = (growth - a.slack_mb * 2**20) / pbytes <= a.max_ratio and shared == total
    nodes = len(captured.graph.nodes)
    result = {
        "config": {"hidden": a.hidden, "intermediate": a.intermediate, "layers": a.layers, "heads": a.heads,
                   "kv_heads": a.kv_heads, "vocab": a.vocab, "dtype": a.dtype},
        "parameters": nparams, "parameter_bytes": pbytes, "parameter_mb": mb(pbytes),
        "graph_nodes": nodes, "patterns": report.counts(),
        "steps": {s.name: s.row() for s in (build, cap, ana, ren)},
        "peak_rss_growth_mb": mb(growth), "growth_over_parameter_bytes": round(ratio, 4),
        "max_ratio": a.max_ratio, "slack_mb": a.slack_mb, "warmup": not a.no_warmup, "weights_shared": f"{shared}/{total}", "peak_reset_supported": cap.resettable,
        "process_start_rss_mb": mb(process_start_rss),
        "ok": ok,
        "env": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
                "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine()},
    }

    print(f"Llama {nparams / 1e9:.2f} B parameters ({a.layers} layers, hidden {a.hidden}, intermediate "
          f"{a.intermediate}, {a.heads} heads / {a.kv_heads} kv, vocab {a.vocab}), {a.dtype}: "
          f"{mb(pbytes):.0f} MB of weights; graph of {nodes} nodes")
    print(f"{'step':<9} {'seconds':>9} {'RSS before MB':>14} {'peak MB':>9} {'RSS after MB':>13} {'peak growth MB':>15}")
    for s in (build, cap, ana, ren):
        r = s.row()
        print(f"{s.name:<9} {r['seconds']:>9.2f} {r['rss_before_mb']:>14.0f} {r['peak_mb']:>9.0f} "
              f"{r['rss_after_mb']:>13.0f} {r['peak_growth_mb']:>15.1f}")
    print(f"patterns: {report.counts()}")
    print(f"weights shared between model and captured graph: {shared}/{total}")
    print(f"peak RSS growth during capture+analysis: {mb(growth):.1f} MB = {ratio:.3f} x parameter bytes "
          f"(limit {a.max_ratio} x + {a.slack_mb:.0f} MB) -> {'OK: no weight copies' if ok else 'FAIL: weights were copied'}")
    if not cap.resettable:
        print("note: peak RSS could not be reset (no /proc/self/clear_refs); growth is measured above the "
              "process's earlier peak")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    if os.environ.get("GRAPHQUANT_BENCH_SUMMARY"):
        print(summary)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
