"""End-to-end speed and memory of lowered models: a Llama-3-8B-shaped model on one GPU.

One call prints a table and writes ``benchmarks/results/e2e_gpu.json``::

    PYTHONPATH=. python benchmarks/e2e_gpu.py [--layers 2] [--quick]

Model: Llama-3-8B shapes (hidden 4096, intermediate 14336, 32 heads, 8 KV heads, head_dim 128,
vocab 128256), random init, bf16, with ``--layers`` decoder layers (default 2) so the run fits the
device budget. Every variant goes through the real pipeline: ``graphquant.quantize(model, config,
calib, lower=True)`` (capture -> [QuaRot] -> Q/DQ -> lower), ``lm_head`` excluded (bf16, as
Quark's CLI does). The graph is captured with ``use_cache=False, logits_to_keep=1``: logits of the
last position only, as in generation. The bf16 baseline is the same captured graph, unquantized.

Measurements (CUDA events, median):

- prefill: batch 8 x 2048 tokens, eager and ``torch.compile`` (static shapes);
- decode: one new token per sequence, batch 1 / 16 / 64, **single-token forward without KV cache**
  (attention over that one token), replayed as a CUDA graph (eager, and ``torch.compile``d
  unless ``--no-compile-decode``); the best of the two is reported per variant;
- per layer = (model time - embedding/final-norm/lm_head time) / layers, the latter measured
  on its own; full 32-layer model = head + 32 x per-layer (an extrapolation, labelled as such);
- weight bytes of the decoder layers (what quantization changes) and the prefill peak memory
  of the variant alone (its resident weights + the activation peak during one prefill).

Targets (issue 6): prefill fp8 >= 1.5x over compiled bf16 (stretch 1.65x); decode batch 1
W4A16 >= 1.6x, W8A16 / W8A8 >= 1.3x; layer weights >= 1.9x smaller (8-bit), >= 3.5x (4-bit).
Decode kernel tiles are measured by ``benchmarks/decode_kernels.py``; KV-cached generation by
``benchmarks/generate_gpu.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import graphquant as gq  # noqa: E402

from graphquant.timing import graphed, median_ms  # noqa: E402
from graphquant.config import Config, QuantizationConfig, QuantizationSpec, QuaRotConfig, preset  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 128256
FULL_LAYERS = 32
DEVICE = "cuda"
PREFILL_SHAPE = (8, 2048)
DECODE_BATCHES = (1, 16, 64)
T0 = time.time()


# ------------------------------------------------------------------------------------ set-up
def llama3_8b(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, head_dim=128, vocab_size=VOCAB, num_hidden_layers=layers,
                      max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM._from_config(cfg, torch_dtype=torch.bfloat16)
    return model.eval()


def w8a16() -> Config:
    return Config(global_quant_config=QuantizationConfig(
        weight=QuantizationSpec(dtype="int8", qscheme="per_channel", ch_axis=0)))


SCHEMES = {  # name -> (config factory, bits of the weights, needs calibration)
    "fp8 static (W8A8 per-tensor)": (lambda: preset("w_fp8_a_fp8"), 8, True),
    "fp8 dynamic (W8A8 per-token)": (lambda: preset("w_fp8_a_fp8_per_token"), 8, False),
    "int8 (W8A8 per-token)": (lambda: preset("w_int8_per_channel_a_int8_per_token"), 8, False),
    "W8A16 (int8 per-channel)": (w8a16, 8, False),
    "W4A16 (int4 sym g128)": (lambda: preset("w_int4_per_group_sym"), 4, False),
}


def hadamard_available() -> bool:
    try:
        from graphquant import hadamard  # noqa: F401

        return hasattr(torch.ops.graphquant, "hadamard_transform")
    except Exception:  # noqa: BLE001
        return False


def example_inputs():
    return {"input_ids": torch.randint(0, 1000, (2, 16), device=DEVICE), "use_cache": False, "logits_to_keep": 1}


def layer_bytes(named_tensors) -> int:
    seen, total = set(), 0
    for name, t in named_tensors:
        if ".layers." in f".{name}" and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def all_bytes(module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------ timing
def cuda_ms(fn, iters: int, warmup: int = 2) -> float:
    return median_ms(fn, iters, "cuda", warmup)


def decode_ms(fn, iters: int) -> tuple[float, str]:
    try:
        replay, g = graphed(fn)
        t = cuda_ms(replay, iters)
        del g
        return t, "cuda-graph"
    except Exception as e:  # noqa: BLE001 - report and time without a graph
        warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:120]}); timing eagerly")
        torch.cuda.synchronize()
        return cuda_ms(fn, iters), "eager-launch"


class Head(torch.nn.Module):
    """What the model does outside its decoder layers: embedding, final norm, lm_head (last position)."""

    def __init__(self, model):
        super().__init__()
        self.embed, self.norm, self.lm_head = model.model.embed_tokens, model.model.norm, model.lm_head

    def forward(self, ids):
        return self.lm_head(self.norm(self.embed(ids)[:, -1:, :]))


def _attempt(r: dict, what: str, fn) -> None:
    """Run one measurement; a failure (e.g. a compile error) is recorded, the others go on."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0][:200] if str(e) else ""
        r.setdefault("errors", []).append(f"{what}: {type(e).__name__}: {first}")
        print(f"   {what} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        torch._dynamo.reset()


def time_runner(call, args, prefill_ids, decode_ids, compile_decode: bool, iters: dict) -> dict:
    """Prefill (eager, compiled) and decode (graph-replayed eager / compiled) times of ``call(ids)``."""
    r = {}
    with torch.no_grad():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call(prefill_ids)
        torch.cuda.synchronize()
        r["prefill_activation_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        r["prefill_eager_ms"] = cuda_ms(lambda: call(prefill_ids), iters["prefill"])
        for b, ids in decode_ids.items():
            r[f"decode{b}_eager_ms"], r["decode_timing"] = decode_ms(lambda ids=ids: call(ids), iters["decode"])
        if not args.no_compile:
            def prefill_compiled():
                t = time.time()
                cp = torch.compile(call, dynamic=False)
                cp(prefill_ids)
                r["compile_prefill_s"] = time.time() - t
                r["prefill_compiled_ms"] = cuda_ms(lambda: cp(prefill_ids), iters["prefill"])
            _attempt(r, "compiled prefill", prefill_compiled)
        if compile_decode and not args.no_compile:
            def decode_compiled():
                t = time.time()
                cd = torch.compile(call, dynamic=True)
                for ids in decode_ids.values():
                    cd(ids)
                r["compile_decode_s"] = time.time() - t
                for b, ids in decode_ids.items():
                    r[f"decode{b}_compiled_ms"], _ = decode_ms(lambda ids=ids: cd(ids), iters["decode"])
            _attempt(r, "compiled decode", decode_compiled)
        torch._dynamo.reset()
    return r


# ------------------------------------------------------------------------------------ variants
def build_variant(model, name: str, quarot: bool, calib):
    """(call, module, report) for a variant; ``name == "bf16"`` is the captured float graph."""
    ex = example_inputs()
    if name == "bf16":
        if quarot:
            gm = gq.rewrite(model, [QuaRotConfig()], example_inputs=ex, check=False)
            return (lambda ids: gm(input_ids=ids).logits), gm, None
        from graphquant.capture import capture

        cap = capture(model, ex)
        return (lambda ids: cap(input_ids=ids).logits), cap.gm, None
    factory, _, needs_calib = SCHEMES[name]
    cfg = dataclasses.replace(factory(), exclude=["*lm_head"])
    if quarot:
        cfg = dataclasses.replace(cfg, pre_quant_opt_config=[QuaRotConfig()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = gq.quantize(model, cfg, calib if needs_calib else None, example_inputs=ex, check=False, lower=True,
                         progress=False)
    return (lambda ids: qm(input_ids=ids).logits), qm, qm.lowering


def run_variant(model, name, quarot, args, inputs, iters, bf16_layer_bytes):
    t = time.time()
    call, module, lowering = build_variant(model, name, quarot, inputs["calib"])
    build_s = time.time() - t
    named = list(module.named_parameters()) + list(module.named_buffers())
    res = {"variant": name, "quarot": quarot, "build_s": build_s,
           "layer_weight_bytes": layer_bytes(named), "model_bytes": all_bytes(module)}
    if lowering is not None:
        kernels = {}
        for e in lowering.get("lowered", []):
            kernels[e["kernel"]] = kernels.get(e["kernel"], 0) + 1
        res["kernels"] = kernels
        res["fake_quant"] = len(lowering.get("fake_quant", []))
        res["fused_hadamard"] = sum(1 for e in lowering.get("lowered", []) if e.get("fused_hadamard"))
    res["weight_ratio"] = bf16_layer_bytes / max(res["layer_weight_bytes"], 1)
    res.update(time_runner(call, args, inputs["prefill"], inputs["decode"], not args.no_compile_decode, iters))
    res["prefill_peak_bytes"] = res["model_bytes"] + res["prefill_activation_peak_bytes"]
    del call, module, lowering
    gc.collect()
    torch.cuda.empty_cache()
    return res


# ------------------------------------------------------------------------------------ reporting
def per_layer(res: dict, head: dict, layers: int) -> None:
    for key, v in list(res.items()):
        if key.endswith("_ms") and key in head:
            res[key.replace("_ms", "_layer_ms")] = (v - head[key]) / layers
            res[key.replace("_ms", "_full32_ms")] = head[key] + FULL_LAYERS * (v - head[key]) / layers


def best(res: dict, stem: str, suffix: str = "layer_ms"):
    vals = [res.get(f"{stem}_{mode}_{suffix}") for mode in ("eager", "compiled")]
    vals = [v for v in vals if v is not None]
    return min(vals) if vals else None


def table(results: list[dict], layers: int) -> str:
    base = next(r for r in results if r["variant"] == "bf16" and not r["quarot"])
    bp = base.get("prefill_compiled_layer_ms") or base["prefill_eager_layer_ms"]
    lines = [f"Per decoder layer (Llama-3-8B shapes, {layers} layers measured, head subtracted), ms; "
             "speedup vs compiled bf16 in ()",
             f"{'variant':34s} {'QuaRot':6s} {'prefill eager':>14s} {'prefill comp.':>18s} "
             + " ".join(f"{'decode b' + str(b):>17s}" for b in DECODE_BATCHES)
             + f" {'layer GB':>9s} {'smaller':>8s} {'peak GB':>8s}"]
    for r in results:
        pc = r.get("prefill_compiled_layer_ms")
        cells = [f"{r['variant']:34s}", f"{'yes' if r['quarot'] else 'no':6s}",
                 f"{r['prefill_eager_layer_ms']:14.3f}",
                 f"{pc:9.3f} ({bp / pc:4.2f}x)" if pc else f"{'-':>18s}"]
        for b in DECODE_BATCHES:
            d = best(r, f"decode{b}")
            bd = best(base, f"decode{b}")
            cells.append(f"{d:8.4f} ({bd / d:4.2f}x)" if d else f"{'-':>17s}")
        cells += [f"{r['layer_weight_bytes'] / layers / 1e9:9.4f}", f"{r['weight_ratio']:7.2f}x",
                  f"{r['prefill_peak_bytes'] / 1e9:8.2f}"]
        lines.append(" ".join(cells))
    lines.append("")
    lines.append(f"Full 32-layer model, extrapolated (head + 32 x layer), ms: "
                 f"{'variant':34s} prefill(compiled) decode b1 / b16 / b64 (best)")
    for r in results:
        pc = r.get("prefill_compiled_full32_ms") or r.get("prefill_eager_full32_ms")
        ds = [best(r, f"decode{b}", "full32_ms") for b in DECODE_BATCHES]
        lines.append(f"  {r['variant'] + (' +QuaRot' if r['quarot'] else ''):42s} {pc:10.2f}   "
                     + " / ".join(f"{d:.3f}" if d else "-" for d in ds))
    return "\n".join(lines)


def targets(results: list[dict]) -> list[dict]:
    base = next(r for r in results if r["variant"] == "bf16" and not r["quarot"])
    out = []

    def add(what, r, value, goal, stretch=None):
        if value is None:
            return
        out.append({"target": what, "variant": r["variant"], "quarot": r["quarot"], "value": round(value, 3),
                    "goal": goal, "pass": value >= goal, "stretch": stretch,
                    "stretch_pass": (value >= stretch) if stretch else None})

    bp = base.get("prefill_compiled_layer_ms")
    bd = best(base, "decode1")
    for r in results:
        if r["variant"] == "bf16":
            continue
        if r["variant"].startswith("fp8") and bp and r.get("prefill_compiled_layer_ms"):
            add("prefill 8x2048 speedup vs compiled bf16", r, bp / r["prefill_compiled_layer_ms"], 1.5, 1.65)
        d = best(r, "decode1")
        if d and bd:
            add("decode b1 speedup vs compiled bf16", r, bd / d, 1.6 if r["variant"].startswith("W4A16") else 1.3)
        bits = SCHEMES[r["variant"]][1]
        add("layer weights smaller", r, r["weight_ratio"], 3.5 if bits == 4 else 1.9)
    return out


# ------------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer iterations and variants (smoke run)")
    ap.add_argument("--variants", default="all", help="comma-separated substrings of variant names, or 'all'")
    ap.add_argument("--no-quarot", action="store_true")
    ap.add_argument("--only-quarot", action="store_true", help="only the variants with online R3/R4")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-compile-decode", action="store_true")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new variants after this many s")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "e2e_gpu.json"))
    args = ap.parse_args()
    assert DEVICE != "cuda" or torch.cuda.is_available(), "needs a CUDA GPU"
    dev = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(f"device: {dev}, torch {torch.__version__}, layers measured: {args.layers}", flush=True)
    out = {"device": dev, "torch": torch.__version__, "layers": args.layers, "results": [], "notes": []}
    iters = {"prefill": 5 if args.quick else 10, "decode": 30 if args.quick else 100}
    model = llama3_8b(args.layers)
    bf16_layer_bytes = layer_bytes(list(model.named_parameters()))
    inputs = {"prefill": torch.randint(0, VOCAB, PREFILL_SHAPE, device=DEVICE),
              "decode": {b: torch.randint(0, VOCAB, (b, 1), device=DEVICE) for b in DECODE_BATCHES},
              "calib": [torch.randint(0, VOCAB, (1, 256), device=DEVICE) for _ in range(2)]}
    head = Head(model)
    hres = time_runner(lambda ids: head(ids), args, inputs["prefill"], inputs["decode"], not args.no_compile_decode,
                       iters)
    out["head"] = hres
    print(f"head (embedding + final norm + lm_head on the last position): prefill {hres['prefill_eager_ms']:.3f} ms, "
          f"decode b1 {hres['decode1_eager_ms']:.4f} ms", flush=True)
    quarot_opts = [False] if args.no_quarot or not hadamard_available() else [False, True]
    if args.only_quarot:
        quarot_opts = [True]
    if not hadamard_available():
        out["notes"].append("graphquant.hadamard / hadamard_transform op not available: QuaRot rows skipped")
    names = ["bf16"] + list(SCHEMES)
    if args.variants != "all":
        keep = [s.strip() for s in args.variants.split(",")]
        names = ["bf16"] + [n for n in SCHEMES if any(k in n for k in keep)]
    if args.quick:
        names = [n for n in names if n in ("bf16", "fp8 dynamic (W8A8 per-token)", "W4A16 (int4 sym g128)",
                                           "int8 (W8A8 per-token)")]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for quarot in quarot_opts:
        for name in names:
            if time.time() - T0 > args.budget_s:
                out["notes"].append(f"time budget reached: {name} (QuaRot={quarot}) and later variants not run")
                break
            print(f"[{time.time() - T0:6.1f}s] {name} QuaRot={quarot} ...", flush=True)
            try:
                r = run_variant(model, name, quarot, args, inputs, iters, bf16_layer_bytes)
            except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
                traceback.print_exc()
                out["notes"].append(f"{name} QuaRot={quarot} failed: {type(e).__name__}: {str(e)[:300]}")
                torch._dynamo.reset()
                gc.collect()
                torch.cuda.empty_cache()
                continue
            per_layer(r, hres, args.layers)
            out["results"].append(r)
            print("   " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                                    if k.endswith(("layer_ms", "_s")) or k in ("kernels", "weight_ratio")), flush=True)
            Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    if any(r["variant"] == "bf16" and not r["quarot"] for r in out["results"]):
        print()
        print(table(out["results"], args.layers))
        out["targets"] = targets(out["results"])
        print("\nTargets (issue 6):")
        for t in out["targets"]:
            extra = f", stretch {t['stretch']}x {'PASS' if t['stretch_pass'] else 'MISS'}" if t["stretch"] else ""
            print(f"  {'PASS' if t['pass'] else 'MISS'}  {t['target']:42s} {t['variant']:30s} "
                  f"{'QuaRot ' if t['quarot'] else ''}{t['value']:.2f}x (goal {t['goal']}x{extra})")
    for n in out["notes"]:
        print("note:", n)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {args.out} ({time.time() - T0:.0f} s)")


if __name__ == "__main__":
    main()
