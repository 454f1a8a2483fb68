"""Who reads graphquant's checkpoints, and how close their logits are (gq-llama-20m, CPU, fp32).

For each scheme: quantize gq-llama-20m (calibration: 8 WikiText-2 windows of 256 tokens), write a
compressed-tensors checkpoint, then load it with ``graphquant.load`` and with
``transformers.AutoModelForCausalLM.from_pretrained`` (compressed-tensors installed) and compare
logits with the in-process model on 4 WikiText-2 test windows of 256 tokens: relative error
``|a - b| / |b|`` (Frobenius), and missing / unexpected keys of the transformers load.

    python benchmarks/export_consumers.py [--rows w8a8_static,w4_sym] [--format compressed-tensors|quark]

Writes ``benchmarks/results/export_consumers_<format>.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
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


ROWS = {
    "w8a8_static": lambda: C.preset("w_int8_a_int8_per_tensor_sym"),
    "w8a8_dynamic_token": lambda: C.preset("w_int8_per_channel_a_int8_per_token"),
    "fp8_static": lambda: C.preset("w_fp8_a_fp8"),
    "w4a16_sym_g128": lambda: C.preset("w_int4_per_group_sym"),
    "w4a16_asym_g128": lambda: C.preset("w_uint4_per_group_asym"),
    "sq_rot_fp8": lambda: C.preset("w_fp8_a_fp8",
                                    pre_quant_opt_config=[C.SmoothQuantConfig(), C.RotationConfig()]),
    "quarot_w8a8_token": lambda: C.preset("w_int8_per_channel_a_int8_per_token",
                                           pre_quant_opt_config=[C.QuaRotConfig()]),
}


def rel(a, b):
    return float((a - b).norm() / b.norm())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--format", default="compressed-tensors")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from graphquant.datasets import calibration_batches, load_text, tokenize_windows
    from graphquant.models.hf import load_model

    model, tok = load_model(str(MODEL))
    calib = calibration_batches(tok, "wikitext", num_calib_data=8, seq_len=256, batch_size=4)
    windows = tokenize_windows(tok, load_text("wikitext"), 256, 4)
    rows = []
    for name in args.rows.split(","):
        t0 = time.time()
        qm = gq.quantize(model, ROWS[name](), calib, progress=False)
        with torch.no_grad():
            ref = qm(input_ids=windows).logits
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "q"
            info = qm.save_pretrained(out, format=args.format)
            size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            with torch.no_grad():
                gq_err = rel(gq.load(out)(input_ids=windows).logits, ref)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tm, li = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
                with torch.no_grad():
                    tf_err = rel(tm.eval()(input_ids=windows).logits, ref)
                keys = {k: sorted(v)[:3] for k, v in li.items() if v}
            except Exception as e:  # noqa: BLE001 - a consumer that cannot read the file is a result
                tf_err, keys = None, {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
        rows.append({"row": name, "graphquant_load_rel_err": gq_err, "transformers_rel_err": tf_err,
                     "transformers_keys": keys, "safetensors_bytes": size, "caveats": len(info["caveats"]),
                     "seconds": round(time.time() - t0, 1)})
        r = rows[-1]
        print(f"{name:22s} gq.load {gq_err:.1e}  transformers "
              f"{'FAIL' if tf_err is None else f'{tf_err:.1e}'}  keys {keys or 'ok'}  {size / 1e6:.1f} MB", flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"export_consumers_{args.format}.json"
    path.write_text(json.dumps({"model": "gq-llama-20m", "device": "cpu", "dtype": "float32",
                                "eval": "4 WikiText-2 test windows x 256", "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
