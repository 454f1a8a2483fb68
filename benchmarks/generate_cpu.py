"""Text generation speed on CPU: float vs quantized (fake-quant and kernel Linears), HF generate with KV cache.

gq-llama-20m in float32, batch 1, greedy, exactly 64 new tokens after a short prompt, torch threads
as set (``OMP_NUM_THREADS``). Quantized models are ``QuantizedModel.to_hf()`` write-backs:
``kernels="never"`` runs every Linear as fake-quant (dequantize + float matmul, bit-identical to
the graph), ``kernels="always"`` runs graphquant's lowering kernels (``int8_linear`` via
``torch._int_mm``, ``int8_weight_only_linear`` via ``_weight_int8pack_mm``, ``int4_linear`` via
``_weight_int4pack_mm_for_cpu``, ``fp8_linear`` via ``_scaled_mm``). For reference, the old route
(the graph ``QuantizedModel`` recomputing the whole prefix per token, no cache) is timed too.

A per-op table times one Linear of each scheme at decode shape (M = 1, gq-llama-20m's shapes) in
both backends; ``graphquant.export.qlinear.CPU_FASTER`` (what ``kernels="auto"`` picks on CPU) is
set from it.

    python benchmarks/generate_cpu.py [--new_tokens 64] [--repeats 3]

Writes ``benchmarks/results/generate_cpu.json`` and ``generate_cpu.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graphquant as gq  # noqa: E402
from graphquant import config as C  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODEL = ROOT.parent / "shared" / "data" / "models" / "gq-llama-20m"
PROMPT = "Once upon a time, in a small village by the sea,"


SCHEMES = {
    "w8a8_int8_token": lambda: C.preset("w_int8_per_channel_a_int8_per_token"),
    "w8a8_int8_static": lambda: C.preset("w_int8_a_int8_per_tensor_sym"),
    "w8a16_int8": lambda: C.preset("w_int8_per_tensor"),
    "w4a16_g128": lambda: C.preset("w_int4_per_group_sym"),
    "fp8_static": lambda: C.preset("w_fp8_a_fp8"),
    "quarot_w8a8_token": lambda: C.preset("w_int8_per_channel_a_int8_per_token",
                                           pre_quant_opt_config=[C.QuaRotConfig()]),
}


def time_generate(model, enc, new_tokens, repeats):
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=2)  # warm-up
        best, out = float("inf"), None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(**enc, **kw)
            best = min(best, time.perf_counter() - t0)
    return new_tokens / best, out


def time_graph_loop(qm, ids, new_tokens):
    """The pre-export route: the graph recomputes the whole prefix for every token."""
    with torch.no_grad():
        t0 = time.perf_counter()
        seq = ids
        for _ in range(new_tokens):
            nxt = qm(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return new_tokens / (time.perf_counter() - t0)


def per_op(hf_never, hf_always, calls=200):
    """Linears of each kernel kind at M = 1 (layer 0's q_proj and down_proj, lm_head): fake-quant vs kernel
    microseconds (the fastest of ``calls`` single calls)."""
    from graphquant.export.qlinear import QuantLinear

    rows = {}
    never = dict(hf_never.named_modules())
    for name, m in hf_always.named_modules():
        if not isinstance(m, QuantLinear) or m.backend != "kernel":
            continue
        if name not in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"):
            continue
        dyn = m.input_quantizer is not None and m.input_quantizer.dynamic
        x = torch.randn(1, 1, m.in_features)
        times = {}
        for label, mod in (("fake_quant", never[name]), ("kernel", m)):
            best = float("inf")
            with torch.no_grad():
                for _ in range(5):
                    mod(x)
                for _ in range(calls):  # the fastest single call: robust to a machine shared with others
                    t0 = time.perf_counter()
                    mod(x)
                    best = min(best, time.perf_counter() - t0)
            times[label] = best * 1e6
        rows[f"{m.kernel}{'/dynamic act' if dyn else ''} {name.split('.')[-1]}"] = {
            "module": name, "shape": [m.out_features, m.in_features], "fake_quant_us": round(times["fake_quant"], 1),
            "kernel_us": round(times["kernel"], 1), "kernel_faster": times["kernel"] < times["fake_quant"]}
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--graph_loop", default="w8a8_int8_token", help="scheme to time the no-cache graph loop for")
    ap.add_argument("--per_op_only", action="store_true", help="only the per-op table (fast)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    from graphquant.datasets import calibration_batches
    from graphquant.models.hf import load_model

    model, tok = load_model(str(MODEL))
    enc = tok(PROMPT, return_tensors="pt")
    calib = calibration_batches(tok, "wikitext", num_calib_data=8, seq_len=256, batch_size=4)
    res = {"model": "gq-llama-20m", "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads(),
           "prompt_tokens": int(enc["input_ids"].shape[1]), "new_tokens": args.new_tokens, "rows": [], "per_op": {}}
    out_name = "generate_cpu_per_op" if args.per_op_only else "generate_cpu"
    if not args.per_op_only:
        tps, out_fp = time_generate(model, enc, args.new_tokens, args.repeats)
        res["rows"].append({"model": "float (HF generate)", "tokens_per_s": round(tps, 1)})
        print(f"{'float':28s} {tps:7.1f} tok/s", flush=True)
    for name in args.schemes.split(","):
        qm = gq.quantize(model, SCHEMES[name](), calib, progress=False)
        hf_never, hf_always = qm.to_hf(kernels="never"), qm.to_hf(kernels="always")
        res["per_op"].update({k: v for k, v in per_op(hf_never, hf_always).items() if k not in res["per_op"]})
        if args.per_op_only:
            print(name, res["per_op"], flush=True)
            _write(res, out_name, args)
            continue
        row = {"model": name}
        for label, hf in (("fake_quant", hf_never), ("kernels", hf_always)):
            t, out = time_generate(hf, enc, args.new_tokens, args.repeats)
            row[f"{label}_tokens_per_s"] = round(t, 1)
            row[f"{label}_same_tokens_as_fake_quant"] = None
            if label == "fake_quant":
                ref_out = out
            else:
                row["kernels_same_tokens_as_fake_quant"] = bool(torch.equal(out, ref_out))
        row.pop("fake_quant_same_tokens_as_fake_quant")
        if name == args.graph_loop:
            row["graph_loop_no_cache_tokens_per_s"] = round(time_graph_loop(qm, enc["input_ids"], args.new_tokens), 1)
        res["rows"].append(row)
        print(f"{name:28s} fake-quant {row['fake_quant_tokens_per_s']:7.1f} tok/s | kernels "
              f"{row['kernels_tokens_per_s']:7.1f} tok/s (same tokens: {row['kernels_same_tokens_as_fake_quant']})"
              + (f" | graph loop, no cache {row['graph_loop_no_cache_tokens_per_s']:.1f} tok/s"
                 if "graph_loop_no_cache_tokens_per_s" in row else ""), flush=True)
        _write(res, out_name, args)
    print("\nper op, M = 1:")
    for k, v in res["per_op"].items():
        print(f"  {k:18s} {str(v['shape']):12s} fake-quant {v['fake_quant_us']:8.1f} us | kernel {v['kernel_us']:8.1f} us")
    print(f"wrote {RESULTS / (out_name + '.json')}")


def _write(res, out_name, args):
    """Results after every row, so a partial run keeps what it measured."""
    import os

    res["load_average_1min"] = round(os.getloadavg()[0], 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{out_name}.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"## Generation on CPU: gq-llama-20m fp32, batch 1, {args.new_tokens} new tokens, "
             f"{res['threads']} threads (best of {args.repeats})", "",
             "| model | fake-quant tok/s | kernels tok/s | same tokens | graph loop (no cache) tok/s |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        if "tokens_per_s" in r:
            lines.append(f"| {r['model']} | {r['tokens_per_s']} | | | |")
        else:
            lines.append(f"| {r['model']} | {r['fake_quant_tokens_per_s']} | {r['kernels_tokens_per_s']} | "
                         f"{r['kernels_same_tokens_as_fake_quant']} | {r.get('graph_loop_no_cache_tokens_per_s', '')} |")
    lines += ["", "| kernel | shape | fake-quant us | kernel us |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['shape']} | {v['fake_quant_us']} | {v['kernel_us']} |" for k, v in res["per_op"].items()]
    (RESULTS / f"{out_name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
