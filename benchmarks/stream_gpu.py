"""Streamed (layer-by-layer) quantization of a Llama-3-8B-shaped model under a GPU budget, against the
in-memory pipeline, and an extrapolation to 70B from the measured per-layer figures.

A Llama-3-8B-shaped model (hidden 4096, intermediate 14336, 32 heads / 8 KV heads, vocab 128256) with
random bf16 weights is written to local disk as sharded safetensors, cut to ``--layers`` decoder
layers (all 32 do not fit a short GPU session; the per-layer figures are what scale). Then:

  A. streamed, W8A8 (int8 per-channel weights, dynamic per-token int8 activations) + QuaRot (R1-R4) +
     GPTQ, ``max_memory={"cuda:0": --gptq_budget}``;
  B. streamed, W8A8 + QuaRot without GPTQ, ``max_memory={"cuda:0": "8GiB"}``;
  C. in memory: the model loaded onto the GPU, ``quantize()`` with the config of A, ``save_pretrained``.

For each: wall time per unit (embedding, each layer, last layer + lm_head), total, peak GPU memory
(``torch.cuda.max_memory_allocated``) and peak host memory (``ru_maxrss``, and the RSS sampled every
10 ms minus the RSS before the run). 32 random windows of 512 tokens calibrate (GPTQ needs at least
14336 tokens: the intermediate size). Results go to ``--out`` (JSON, written after every stage) and a
table is printed; the 8B (32 layers) and 70B (80 layers, hidden 8192, intermediate 28672) totals are
EXTRAPOLATED from the measured per-layer times and memory, on paper.

    python benchmarks/stream_gpu.py --layers 2 --out benchmarks/results/stream_gpu.json
    python benchmarks/stream_gpu.py --shape tiny --device cpu      # a quick check of the script
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                 vocab_size=2048, max_position_embeddings=1024),
}
SHAPE_70B = dict(hidden_size=8192, intermediate_size=28672, layers=80, vocab_size=128256, num_key_value_heads=8,
                 num_attention_heads=64)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())
        return False


def write_model(folder: Path, shape: dict, layers: int, dtype, device) -> int:
    """Random weights (std 0.02, norms around 1) straight into sharded safetensors; returns bytes."""
    import torch
    import transformers as tf
    from accelerate import init_empty_weights

    from graphquant.export.shards import write_sharded

    cfg = tf.LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, **shape)
    cfg.dtype = dtype
    with init_empty_weights():
        model = tf.LlamaForCausalLM(cfg)
    g = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for name, p in model.named_parameters():
        t = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
        t = (1 + 0.1 * t) if p.dim() == 1 else 0.02 * t
        tensors[name] = t.to(dtype).cpu()
    folder.mkdir(parents=True, exist_ok=True)
    write_sharded(tensors, folder, "2GB")
    cfg.save_pretrained(folder)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def config(gptq: bool):
    from graphquant.config import GPTQConfig, QuaRotConfig, preset

    cfg = preset("w_int8_per_channel_a_int8_per_token")
    cfg.pre_quant_opt_config = [QuaRotConfig()]
    cfg.algo_config = [GPTQConfig()] if gptq else None
    return cfg


def run_streamed(folder, out, calib, gptq: bool, budget: str, dtype, device) -> dict:
    import torch

    from graphquant.stream import quantize_streamed

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        res = quantize_streamed(folder, config(gptq), calib, out, max_memory=budget, dtype=dtype,
                                device=device if device == "cpu" else None, progress=False, overwrite=True)
        total = time.perf_counter() - t0
    layer_units = [u for u in res.units if u.name.startswith("model.layers.") and "+" not in u.name]
    return {"budget": budget, "total_s": total, "capture_and_setup_s": total - sum(u.seconds for u in res.units),
            "units": [{"name": u.name, "s": round(u.seconds, 3), "weights_bytes": u.weight_bytes,
                       "cuda_peak_bytes": u.cuda_peak_bytes} for u in res.units],
            "per_layer_s": (sum(u.seconds for u in layer_units) / len(layer_units)) if layer_units else None,
            "peak_gpu_bytes": res.cuda_peak_bytes, "peak_rss_growth_bytes": rss.peak - rss.start,
            "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "estimate": res.estimate}


def run_in_memory(folder, out, calib, dtype, device) -> dict:
    import torch

    import graphquant as gq
    from graphquant.models.hf import load_model

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        model, _ = load_model(folder, dtype=dtype, device=device)
        t_load = time.perf_counter() - t0
        qm = gq.quantize(model, config(True), [{k: v.to(device) for k, v in b.items()} for b in calib],
                         progress=False, check=False)
        t_q = time.perf_counter() - t0 - t_load
        qm.save_pretrained(out, overwrite=True)
        total = time.perf_counter() - t0
    return {"total_s": total, "load_s": t_load, "quantize_s": t_q, "save_s": total - t_load - t_q,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
            "peak_rss_growth_bytes": rss.peak - rss.start}


def extrapolate(res: dict, layers: int, shape: dict) -> dict:
    """On paper: per-layer time scales with the layer's weights (x4 from 8B to 70B: hidden x2 and
    intermediate x2) for the matmuls, GPTQ's Hessian work with in_features^3 (x8); both are given."""
    stage = next((k for k in ("A_streamed_gptq", "B_streamed_no_gptq") if (res.get(k) or {}).get("per_layer_s")), None)
    if stage is None:
        return {}
    a = res[stage]
    per_layer = a["per_layer_s"]
    edge = a["total_s"] - per_layer * layers
    h, i = shape["hidden_size"], shape["intermediate_size"]
    w_ratio = (SHAPE_70B["hidden_size"] * (2 * SHAPE_70B["hidden_size"] + 2 * 1024 + 3 * SHAPE_70B["intermediate_size"])) \
        / (h * (2 * h + 2 * 1024 + 3 * i))
    return {"label": f"EXTRAPOLATION from the measured per-layer time of {stage}, not measured", "from_stage": stage,
            "llama3_8b_32_layers_s": edge + 32 * per_layer,
            "llama3_70b_80_layers_s_weights_scaling": edge * 2 + 80 * per_layer * w_ratio,
            "llama3_70b_80_layers_s_cubic_scaling": edge * 2 + 80 * per_layer * 8,
            "llama3_70b_layer_weights_bytes_bf16": int(SHAPE_70B["hidden_size"] * (2 * SHAPE_70B["hidden_size"]
                                                       + 2 * 1024 + 3 * SHAPE_70B["intermediate_size"]) * 2),
            "llama3_70b_gptq_hessian_fp64_bytes": SHAPE_70B["intermediate_size"] ** 2 * 8}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--gptq_budget", default="24GiB")
    p.add_argument("--budget", default="8GiB")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--skip", default="", help="comma-separated stages to skip: A,B,C")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stream_gpu.json"))
    args = p.parse_args()
    warnings.simplefilter("ignore")
    import torch

    dtype = torch.bfloat16
    shape = SHAPES[args.shape]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gq-stream-"))
    folder = work / "model"
    res: dict = {"shape": args.shape, "layers_measured": args.layers, "device": args.device,
                 "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                 "torch": torch.__version__, "config": "w_int8_per_channel_a_int8_per_token + QuaRot (R1-R4)"}

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1, default=str) + "\n")

    t0 = time.perf_counter()
    res["model_bytes"] = write_model(folder, shape, args.layers, dtype, args.device)
    res["write_model_s"] = time.perf_counter() - t0
    save()
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, shape["vocab_size"], (1, args.seq_len), generator=g)}
             for _ in range(args.windows)]
    dev_key = "cpu" if args.device == "cpu" else "cuda:0"
    stages = [("A_streamed_gptq", lambda: run_streamed(folder, work / "a", calib, True, f"{dev_key}={args.gptq_budget}",
                                                       dtype, args.device)),
              ("B_streamed_no_gptq", lambda: run_streamed(folder, work / "b", calib, False, f"{dev_key}={args.budget}",
                                                          dtype, args.device)),
              ("C_in_memory_gptq", lambda: run_in_memory(folder, work / "c", calib, dtype, args.device))]
    for name, fn in stages:
        if name[0] in args.skip.split(","):
            continue
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - record and go on to the next stage
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:600]}"}
        save()
        print(name, json.dumps(res[name], default=str)[:600], flush=True)
    res["extrapolation"] = extrapolate(res, args.layers, shape)
    save()
    gib = 2 ** 30
    print(f"\n{'stage':<22} {'total s':>8} {'s/layer':>8} {'GPU peak GiB':>13} {'host RSS growth GiB':>20}")
    for name, _ in stages:
        r = res.get(name) or {}
        if "error" in r or not r:
            print(f"{name:<22} {r.get('error', 'skipped')[:80]}")
            continue
        gpu = r.get("peak_gpu_bytes")
        print(f"{name:<22} {r['total_s']:8.1f} {r.get('per_layer_s') or float('nan'):8.2f} "
              f"{(gpu or 0) / gib:13.2f} {r['peak_rss_growth_bytes'] / gib:20.2f}")
    if res["extrapolation"]:
        print("EXTRAPOLATED (not measured):", json.dumps(res["extrapolation"]))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
