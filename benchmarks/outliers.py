"""Max/mean ratio of Linear inputs before and after the offline rewrites (and R4).

- a synthetic Llama (4 layers, hidden 256) with planted outlier channels in every norm weight:
  R1 should flatten the inputs of q/k/v and gate/up;
- gq-llama-20m (if ../shared is present): R1, smoothing, and R4 on down_proj inputs;
- all-MiniLM-L6-v2 (if installed): smoothing and R2 on the attention output dense, R4 on the FFN
  output dense.

Ratio = max over channels of max|x| / mean over channels of max|x| at a Linear's input, over the
calibration batches; lower is easier to quantize per tensor. Writes benchmarks/results/outliers.json.
"""
from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graphquant as gq  # noqa: E402
from graphquant.calibrate import collect_channel_absmax  # noqa: E402
from graphquant.config import QuaRotConfig, RotationConfig, SmoothQuantConfig  # noqa: E402
from graphquant.patterns.base import AnalysisContext  # noqa: E402


def input_ratios(fm, calib, suffixes) -> dict[str, float]:
    lin = {s.fqn: s for s in AnalysisContext(fm.captured).linears.values()}
    nodes = {f: s.node.args[0] for f, s in lin.items() if any(re.search(p, f) for p in suffixes)}
    stats = collect_channel_absmax(fm.captured, nodes, calib, progress=False)
    return {k: float(v.max() / v.mean()) for k, v in stats.items()}


def summarize(name, model, calib, configs: dict, suffixes, kw=None) -> dict:
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, cfg in configs.items():
            fm = gq.rewrite(model, cfg, calib_data=calib, example_inputs=kw)
            r = input_ratios(fm, calib, suffixes)
            out[label] = {s: sum(v for k, v in r.items() if re.search(s, k)) / max(1, sum(bool(re.search(s, k)) for k in r))
                          for s in suffixes}
    print(f"\n{name}: mean over layers of max/mean channel max|x| at Linear inputs")
    names = [s.replace("\\", "").strip("$").replace("d+.", "") for s in suffixes]
    print(f"{'rewrite':28s}" + "".join(f"{n:>24s}" for n in names))
    for label, row in out.items():
        print(f"{label:28s}" + "".join(f"{row[s]:24.2f}" for s in suffixes))
    return out


def synthetic():
    from graphquant.models.tiny import tiny_model

    m = tiny_model("llama", num_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p[[7, 100, 201]] *= 40.0
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 128, (2, 64), generator=g) for _ in range(4)]
    return summarize("synthetic Llama, planted outlier channels", m, calib,
                     {"none": [], "R1": [RotationConfig()], "QuaRot R1-R4": [QuaRotConfig()]},
                     [r"q_proj$", r"gate_proj$", r"down_proj$"])


def llama20m():
    import os

    shared = Path(os.environ.get("GRAPHQUANT_SHARED", ROOT.parent / "shared"))
    path = shared / "data" / "models" / "gq-llama-20m"
    if not path.exists():
        print("gq-llama-20m not found; skipped")
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from graphquant.datasets import calibration_batches

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    calib = calibration_batches(tok, "wikitext", num_calib_data=4, seq_len=512, split="valid", batch_size=2)
    return summarize("gq-llama-20m (4 x 512 WikiText-2 valid tokens)", model, calib,
                     {"none": [], "SmoothQuant a=0.5 fc_fc": [SmoothQuantConfig(alpha=0.5, fc_fc=True)],
                      "R1": [RotationConfig()], "QuaRot R1-R4": [QuaRotConfig()]},
                     [r"q_proj$", r"o_proj$", r"gate_proj$", r"down_proj$"])


def minilm():
    from graphquant.models.hf import find_minilm_path

    path = find_minilm_path()
    if path is None:
        print("all-MiniLM-L6-v2 not installed; skipped")
        return None
    from transformers import AutoModel, AutoTokenizer

    from graphquant.datasets import load_sentences, sentence_batches

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    batches = sentence_batches(tok, load_sentences("wikitext", n=64), batch_size=32)
    calib = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches]
    return summarize("all-MiniLM-L6-v2 (64 WikiText-2 sentences)", model, calib,
                     {"none": [], "SmoothQuant a=0.5": [SmoothQuantConfig(alpha=0.5)],
                      "QuaRot (R2, R3, R4)": [QuaRotConfig()],
                      "SmoothQuant + QuaRot": [SmoothQuantConfig(alpha=0.5), QuaRotConfig()]},
                     [r"attention\.output\.dense$", r"intermediate\.dense$", r"\d+\.output\.dense$"],
                     kw=dict(calib[0]))


def main():
    torch.manual_seed(0)
    res = {"synthetic_llama": synthetic(), "gq_llama_20m": llama20m(), "minilm": minilm()}
    out = ROOT / "benchmarks" / "results" / "outliers.json"
    out.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
