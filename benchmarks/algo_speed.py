"""Wall time and peak memory of the GPTQ and AWQ passes, and their scaling with the number of layers.

CPU (default): gq-llama-20m (``../shared/data/models/gq-llama-20m`` next to the repository, or
``--model``; a random-init model of the same shape when it is absent) cut to 2, 4 and 8 layers,
calibrated on 8 WikiText-2 windows of 256 tokens (random tokens without the tokenizer), float32.
GPU: ``--device cuda --shape 1b`` runs a 1B Llama shape (TinyLlama-1.1B: hidden 2048, 22 layers;
random init) cut to 4/8/16/22 layers, bfloat16, 128 random windows of 512 tokens.

The scheme is W4 weight-only (``w_uint4_per_group_asym``, group 128, lm_head excluded). Each
(algorithm, layers) point runs in a fresh subprocess, so peak memory is its own: on CPU the
resident set size sampled every 5 ms while the pass runs (and its growth over the RSS before the
pass), on CUDA ``torch.cuda.max_memory_allocated``. Capture + analysis time is reported apart.
The pass's own log gives the quality: GPTQ's mean relative layer-output error vs round-to-nearest,
AWQ's mean loss vs alpha=0.

    python benchmarks/algo_speed.py                      # CPU, gq-llama-20m, 2/4/8 layers
    python benchmarks/algo_speed.py --threads 1 --repeat 3   # steadier on a shared machine
    python benchmarks/algo_speed.py --device cuda --shape 1b
Writes benchmarks/results/algo_speed_<shape>_<cpu|gpu>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = ROOT.parent / "shared" / "data" / "models" / "gq-llama-20m"
SHAPES = {
    "20m": dict(hidden_size=384, intermediate_size=1152, num_hidden_layers=8, num_attention_heads=6,
                num_key_value_heads=2, vocab_size=8192, head_dim=64),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
}


# ------------------------------------------------------------------------------------------ memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples the resident set size in a thread while active."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.start = self.peak = _rss_bytes()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes())
        return False


# ------------------------------------------------------------------------------------------ worker
def _model_and_calib(args):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    source = "random init"
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL
    if args.shape == "20m" and (model_dir / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model.model.layers = model.model.layers[:args.layers]
        model.config.num_hidden_layers = args.layers
        source = str(model_dir)
    else:
        cfg = LlamaConfig(**{**SHAPES[args.shape], "num_hidden_layers": args.layers}, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(dtype)
    model = model.eval().to(args.device)
    calib = None
    if source != "random init":
        try:
            from transformers import AutoTokenizer

            from graphquant.datasets import calibration_batches

            tok = AutoTokenizer.from_pretrained(model_dir)
            calib = calibration_batches(tok, "wikitext", num_calib_data=args.num_calib, seq_len=args.seq_len)
            source += " + wikitext"
        except Exception as e:  # noqa: BLE001 - fall back to random tokens, and say so
            print(f"(no WikiText calibration: {type(e).__name__}: {e}; using random tokens)", file=sys.stderr)
    if calib is None:
        vocab = model.config.vocab_size
        calib = [{"input_ids": torch.randint(0, vocab, (1, args.seq_len), generator=gen)}
                 for _ in range(args.num_calib)]
    return model, calib, source


def worker(args) -> dict:
    import torch

    import graphquant as gq  # noqa: F401  (registers passes)
    from graphquant.api import run_pipeline
    from graphquant.capture import capture
    from graphquant.config import AWQConfig, GPTQConfig, preset
    from graphquant.passes import PassContext
    from graphquant.patterns.report import analyze_graph
    from graphquant.plan import make_plan

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    model, calib, source = _model_and_calib(args)
    params = sum(p.numel() for p in model.parameters())
    algo = {"gptq": GPTQConfig(), "awq": AWQConfig()}[args.algo]
    config = preset("w_uint4_per_group_asym")
    config.exclude = ["*lm_head"]
    config.algo_config = [algo]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    times, t_capture, ctx, mems = [], [], None, []
    for _ in range(max(1, args.repeat)):  # each repeat on a fresh copy (the pass rewrites the weights)
        work = copy.deepcopy(model)
        sync()
        t0 = time.perf_counter()
        captured = capture(work, None)
        report = analyze_graph(captured)
        sync()
        t_capture.append(time.perf_counter() - t0)
        batches = [{k: v.to(args.device) for k, v in b.items()} for b in calib]
        ctx = PassContext(captured, report, make_plan(report), config=config, calib_data=batches)
        ctx.stats["progress"] = False
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base_gpu = torch.cuda.memory_allocated()
        with _PeakRSS() as mem:
            t2 = time.perf_counter()
            run_pipeline(ctx, [args.algo], check=False)
            sync()
            times.append(time.perf_counter() - t2)
        mems.append(mem)
        if cuda:
            gpu_peak, gpu_base = torch.cuda.max_memory_allocated(), base_gpu
        del captured, work
    best = min(times)
    out = {"algo": args.algo, "layers": args.layers, "params": params, "model": source, "device": args.device,
           "dtype": args.dtype, "threads": torch.get_num_threads(), "calib_windows": len(calib),
           "seq_len": args.seq_len, "capture_analyze_s": min(t_capture), "algo_s": best, "algo_s_all": times,
           "algo_s_per_layer": best / args.layers,
           # the first run's memory: later runs reuse memory the allocator kept
           "rss_before_mib": mems[0].start / 2**20, "rss_peak_mib": mems[0].peak / 2**20,
           "rss_growth_mib": (mems[0].peak - mems[0].start) / 2**20}
    if cuda:
        out["gpu_peak_mib"] = gpu_peak / 2**20
        out["gpu_peak_over_model_mib"] = (gpu_peak - gpu_base) / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    if args.algo == "gptq":
        rows = [e for e in ctx.log if e.get("action") == "gptq"]
        out["linears"] = len(rows)
        out["mean_rel_output_error_gptq"] = sum(e["output_error"] for e in rows) / max(len(rows), 1)
        out["mean_rel_output_error_rtn"] = sum(e["output_error_rtn"] for e in rows) / max(len(rows), 1)
        out["codes_changed_by_rtn"] = sum(e["codes_changed_by_rtn"] for e in rows)
    else:
        rows = [e for e in ctx.log if e.get("action") == "awq"]
        clips = [e for e in ctx.log if e.get("action") == "awq_clip"]
        out["sites"] = len(rows)
        out["mean_loss_ratio_vs_alpha0"] = sum(e["loss"] / e["loss_alpha0"] for e in rows if e["loss_alpha0"] > 0) \
            / max(len(rows), 1)
        out["mean_alpha"] = sum(e["alpha"] for e in rows) / max(len(rows), 1)
        out["clip_kept"] = sum(bool(e["kept"]) for e in clips)
    return out


# ------------------------------------------------------------------------------------------ driver
def _fit(rows):
    """Least-squares time = a + b * layers, and the largest relative residual."""
    xs = [r["layers"] for r in rows]
    ys = [r["algo_s"] for r in rows]
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    resid = max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys))
    return {"intercept_s": a, "s_per_layer": b, "max_rel_residual": resid}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default=None, choices=list(SHAPES), help="20m (CPU default) or 1b (GPU default)")
    ap.add_argument("--model", default=None, help=f"gq-llama-20m folder (default {DEFAULT_MODEL})")
    ap.add_argument("--layers", default=None, help="comma-separated layer counts")
    ap.add_argument("--algos", default="gptq,awq")
    ap.add_argument("--num_calib", type=int, default=None, help="calibration windows (CPU 8, GPU 128)")
    ap.add_argument("--seq_len", type=int, default=None, help="tokens per window (CPU 256, GPU 512)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per point; the fastest is reported")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--algo", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.shape = args.shape or ("1b" if gpu else "20m")
    args.num_calib = args.num_calib or (128 if gpu else 8)
    args.seq_len = args.seq_len or (512 if gpu else 256)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.worker:
        args.layers = int(args.layers)
        print("RESULT " + json.dumps(worker(args)))
        return
    layers = [int(x) for x in (args.layers or ("4,8,16,22" if args.shape == "1b" else "2,4,8")).split(",")]
    rows = []
    for algo in args.algos.split(","):
        for n in layers:
            cmd = [sys.executable, __file__, "--worker", "--algo", algo, "--layers", str(n), "--device", args.device,
                   "--shape", args.shape, "--num_calib", str(args.num_calib), "--seq_len", str(args.seq_len),
                   "--dtype", args.dtype, "--threads", str(args.threads), "--repeat", str(args.repeat)]
            cmd += ["--model", args.model] if args.model else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                raise SystemExit(f"worker failed: {' '.join(cmd)}")
            r = json.loads(line[len("RESULT "):])
            rows.append(r)
            mem = (f"GPU peak {r['gpu_peak_mib']:.0f} MiB (+{r['gpu_peak_over_model_mib']:.0f})" if gpu else
                   f"RSS peak {r['rss_peak_mib']:.0f} MiB (+{r['rss_growth_mib']:.0f})")
            print(f"{algo:>5} {n:>3} layers: {r['algo_s']:7.2f} s ({r['algo_s_per_layer']:.2f} s/layer), {mem}; "
                  f"capture+analyze {r['capture_analyze_s']:.1f} s", flush=True)
    fits = {algo: _fit([r for r in rows if r["algo"] == algo]) for algo in args.algos.split(",")}
    first = rows[0]
    print(f"\n{args.shape} Llama ({first['model']}), {args.dtype}, {args.device}, threads {first['threads']}, "
          f"{args.num_calib} x {args.seq_len} calibration tokens, W4 uint4 g128 weight-only, "
          f"best of {args.repeat}")
    print(f"{'algo':>5} {'layers':>6} {'params (M)':>10} {'time s':>8} {'s/layer':>8} {'peak MiB':>9} "
          f"{'growth MiB':>10}  quality")
    for r in rows:
        peak = r.get("gpu_peak_mib", r["rss_peak_mib"])
        growth = r.get("gpu_peak_over_model_mib", r["rss_growth_mib"])
        if r["algo"] == "gptq":
            q = (f"rel. layer-output error GPTQ {r['mean_rel_output_error_gptq']:.4f} vs RTN "
                 f"{r['mean_rel_output_error_rtn']:.4f}")
        else:
            q = f"loss / loss(alpha=0) {r['mean_loss_ratio_vs_alpha0']:.3f}, mean alpha {r['mean_alpha']:.2f}"
        print(f"{r['algo']:>5} {r['layers']:>6} {r['params'] / 1e6:>10.1f} {r['algo_s']:>8.2f} "
              f"{r['algo_s_per_layer']:>8.2f} {peak:>9.0f} {growth:>10.0f}  {q}")
    for algo, f in fits.items():
        if f:
            print(f"{algo}: time = {f['intercept_s']:.2f} s + {f['s_per_layer']:.2f} s x layers "
                  f"(largest deviation from the line {100 * f['max_rel_residual']:.0f}%)")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / \
        f"algo_speed_{args.shape}_{'gpu' if gpu else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "fits": fits}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
