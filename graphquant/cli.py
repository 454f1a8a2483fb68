"""The ``graphquant`` command line: ``report`` | ``quantize`` | ``eval`` | ``generate``.

``graphquant report --model PATH_OR_HUB_ID [--json FILE] [--dot FILE]`` prints which layers can be
smoothed and rotated (and why not), and optionally writes the report as JSON and Graphviz text.

Exit codes: 0 success; 1 the model loaded but could not be analysed; 2 bad usage, or a model that
cannot be loaded (missing path, unreachable hub id, unreadable checkpoint). Errors are one clear
message on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_ANALYSIS, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A user-facing failure: ``message`` goes to stderr, ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


# --- model loading ---------------------------------------------------------------------------------
def load_for_cli(src: str, trust_remote_code: bool = False):
    """Load a model from a folder, a llama2.c checkpoint or a hub id; raise :class:`CliError` (exit 2)
    with a one-line reason when that fails."""
    from .errors import GraphQuantError

    try:
        from .models.hf import load_model
    except ImportError:  # the loader module is optional; fall back to plain transformers
        load_model = _fallback_load_model
    try:
        loaded = load_model(src, trust_remote_code=trust_remote_code)
    except (GraphQuantError, OSError, ValueError, ImportError) as e:
        raise CliError(f"cannot load model {src!r}: {_one_line(e)}", EXIT_USAGE) from e
    return loaded[0] if isinstance(loaded, tuple) else loaded


def _fallback_load_model(src: str, trust_remote_code: bool = False):
    """``AutoModelForCausalLM`` falling back to ``AutoModel`` (encoders); used when
    ``graphquant.models.hf`` is not available."""
    from transformers import AutoModel, AutoModelForCausalLM

    p = Path(src).expanduser()
    looks_like_path = src.startswith((".", "/", "~")) or "\\" in src or src.count("/") > 1
    if not p.exists() and looks_like_path:
        raise OSError(f"no such file or directory: {p}")
    where = str(p) if p.exists() else src
    try:
        model = AutoModelForCausalLM.from_pretrained(where, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        model = AutoModel.from_pretrained(where, trust_remote_code=trust_remote_code)
    return model.eval()


# --- report ----------------------------------------------------------------------------------------
def _cmd_report(args) -> int:
    from . import analyze
    from .errors import GraphQuantError

    model = load_for_cli(args.model, trust_remote_code=args.trust_remote_code)
    try:
        report = analyze(model)
    except GraphQuantError as e:
        raise CliError(f"cannot analyze {args.model!r}: {e}", EXIT_ANALYSIS) from e
    print(report.summary())
    for path, text, what in ((args.json, report.to_json, "JSON"), (args.dot, report.to_dot, "Graphviz")):
        if path is None:
            continue
        try:
            Path(path).write_text(text() + "\n")
        except OSError as e:
            raise CliError(f"cannot write the {what} report to {path}: {_one_line(e)}", EXIT_USAGE) from e
        print(f"wrote {what} report to {path}", file=sys.stderr)
    return EXIT_OK


# --- quantize / eval -----------------------------------------------------------------------------
def is_quantized_checkpoint(src: str) -> bool:
    """A folder graphquant wrote, or any folder whose config.json carries a quantization_config."""
    import json

    p = Path(src).expanduser()
    if not (p / "config.json").is_file():
        return False
    from .export.safe_output import MARKER

    if (p / MARKER).is_file():
        return True
    try:
        return "quantization_config" in json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _load_quantized(src: str, device: str, kernels: str = "never"):
    """``graphquant.load`` plus the folder's tokenizer (None when it has none)."""
    from . import load
    from .errors import GraphQuantError

    try:
        model = load(src, device=device, kernels=kernels)
    except (GraphQuantError, OSError, ValueError, ImportError) as e:
        raise CliError(f"cannot load quantized model {src!r}: {_one_line(e)}", EXIT_USAGE) from e
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(Path(src).expanduser()))
    except (OSError, ValueError):
        tok = None
    return model, tok


def _load_with_tokenizer(args):
    from .errors import GraphQuantError
    from .models.hf import load_model

    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    try:
        if is_quantized_checkpoint(args.model):
            model, tok = _load_quantized(args.model, args.device, getattr(args, "kernels", "never"))
        else:
            model, tok = load_model(args.model, dtype=dtype, device=args.device,
                                    trust_remote_code=args.trust_remote_code)
    except (GraphQuantError, OSError, ValueError, ImportError) as e:
        raise CliError(f"cannot load model {args.model!r}: {_one_line(e)}", EXIT_USAGE) from e
    if tok is None:
        raise CliError(f"{args.model!r} has no tokenizer; calibration and evaluation need one", EXIT_USAGE)
    return model, tok


def build_config(args):
    """The graphquant Config the quantize flags describe (Quark's quantize_quark.py flags)."""
    import dataclasses

    from . import config as C

    if not args.quant_scheme:
        raise CliError("--quant_scheme is required, e.g. w_int8_per_tensor_a_int8_per_tensor; known: "
                       + ", ".join(C.list_presets()), EXIT_USAGE)
    try:
        cfg = C.preset(args.quant_scheme)
        if args.group_size:
            g = cfg.global_quant_config
            if g.weight is None:
                raise CliError("--group_size needs a scheme with quantized weights", EXIT_USAGE)
            w = dataclasses.replace(g.weight, qscheme=C.QSchemeType.per_group, group_size=args.group_size,
                                    ch_axis=None)
            cfg = dataclasses.replace(cfg, global_quant_config=dataclasses.replace(g, weight=w))
        pre = []
        for name in args.pre_quantization_optimization or []:
            pre.append({"smoothquant": C.SmoothQuantConfig, "rotation": C.RotationConfig,
                        "quarot": C.QuaRotConfig}[name]())
        algos = []
        if args.quant_algo == "autosmoothquant":
            algos.append(C.AutoSmoothQuantConfig())
        elif args.quant_algo == "gptq":
            algos.append(C.GPTQConfig())
        elif args.quant_algo == "awq":
            algos.append(C.AWQConfig())
        cfg = dataclasses.replace(cfg, pre_quant_opt_config=pre, algo_config=algos or None,
                                  exclude=list(args.exclude_layers or []) or cfg.exclude)
        if args.kv_cache_dtype:
            cfg = C.with_kv_cache(cfg, args.kv_cache_dtype)
    except C.ConfigError as e:
        raise CliError(_one_line(e), EXIT_USAGE) from e
    return cfg


def _eval_windows(args, tok):
    from .datasets import gutenberg_eval_windows, load_text, tokenize_windows

    if (args.eval_dataset or "wikitext") == "gutenberg":
        return gutenberg_eval_windows(tok, args.seq_len or 512, args.eval_windows)
    text = load_text(args.eval_dataset or "wikitext")
    return tokenize_windows(tok, text, args.seq_len or 512, args.eval_windows)


def _check_output_dir(args) -> None:
    """Refuse an unsafe --output_dir before the (long) quantization."""
    if not args.output_dir:
        return
    from .export.safe_output import OutputDirError, check_output_dir

    try:
        check_output_dir(args.output_dir, inputs=[args.model], overwrite=args.overwrite)
    except OutputDirError as e:
        raise CliError(_one_line(e), EXIT_USAGE) from e


def _save(qmodel, args, tok) -> None:
    """Write the checkpoint (--model_export format) and say which consumer ignores what."""
    from .errors import GraphQuantError
    from .export.safe_output import OutputDirError

    try:
        info = qmodel.save_pretrained(args.output_dir, format=args.model_export, max_shard_size=args.max_shard_size,
                                      overwrite=args.overwrite, tokenizer=tok, source=args.model)
    except OutputDirError as e:
        raise CliError(_one_line(e), EXIT_USAGE) from e
    except GraphQuantError as e:
        raise CliError(f"cannot save to {args.output_dir}: {_one_line(e)}", EXIT_ANALYSIS) from e
    print(f"saved {info['format']} checkpoint to {args.output_dir} (load it with graphquant.load, "
          f"`graphquant eval --model {args.output_dir}` or `graphquant generate --model {args.output_dir}`)")
    for note in info.get("notes", []):
        print(f"  note: {note}")
    for c in info.get("caveats", []):
        print(f"  caveat: {c}")


def _cmd_quantize(args) -> int:
    """``graphquant quantize``: quantize a model as Quark's quantize_quark.py would, optionally
    print FP vs quantized perplexity and save the result."""
    import time

    from . import quantize
    from .datasets import calibration_batches
    from .errors import GraphQuantError

    cfg = build_config(args)
    _check_output_dir(args)
    if getattr(args, "max_memory", None):
        return _cmd_quantize_streamed(args, cfg)
    model, tok = _load_with_tokenizer(args)
    try:
        calib = calibration_batches(tok, args.dataset or "wikitext", num_calib_data=args.num_calib_data or 16,
                                    seq_len=args.seq_len or 512, batch_size=4)
        calib = [{k: v.to(args.device) for k, v in b.items()} for b in calib]
        t0 = time.time()
        qmodel = quantize(model, cfg, calib, lower=args.lower)
        print(f"quantized in {time.time() - t0:.1f}s: scheme {args.quant_scheme}, "
              f"pre-optimizations {args.pre_quantization_optimization or 'none'}, algorithm {args.quant_algo or 'none'}")
        for line in qmodel.plan.describe():
            print("  " + line)
        if args.eval_ppl:
            from .eval import perplexity

            windows = _eval_windows(args, tok)
            fp = perplexity(model, windows, batch_size=args.batch_size)
            q = perplexity(qmodel, windows, batch_size=args.batch_size)
            print(f"perplexity on {args.eval_dataset or 'wikitext'} ({fp.num_windows} windows x {windows.shape[1]}):"
                  f" FP {fp.ppl:.3f} | quantized {q.ppl:.3f} ({100 * (q.ppl / fp.ppl - 1):+.2f}%)")
        if args.output_dir:
            _save(qmodel, args, tok)
    except GraphQuantError as e:
        raise CliError(f"quantization failed: {_one_line(e)}", EXIT_ANALYSIS) from e
    return EXIT_OK


def _cmd_quantize_streamed(args, cfg) -> int:
    """``graphquant quantize --max_memory ...``: the streamed pipeline (one layer resident at a time),
    for models larger than memory; the checkpoint goes to --output_dir."""
    from pathlib import Path

    import torch

    from .datasets import calibration_batches
    from .errors import GraphQuantError
    from .memory import format_bytes
    from .models.hf import load_tokenizer
    from .stream import quantize_streamed

    if not args.output_dir:
        raise CliError("--max_memory streams the model layer by layer into a checkpoint: pass --output_dir", EXIT_USAGE)
    if args.eval_ppl or args.lower:
        raise CliError("--eval_ppl and --lower need the whole model in memory; evaluate the saved checkpoint with "
                       f"`graphquant eval --model {args.output_dir}` instead", EXIT_USAGE)
    if not (Path(args.model).expanduser() / "config.json").is_file():
        raise CliError(f"--max_memory needs a local Hugging Face model folder with safetensors weights; "
                       f"{args.model!r} is not one", EXIT_USAGE)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    try:
        tok = load_tokenizer(args.model, required=True)
        calib = calibration_batches(tok, args.dataset or "wikitext", num_calib_data=args.num_calib_data or 16,
                                    seq_len=args.seq_len or 512, batch_size=4)
        res = quantize_streamed(args.model, cfg, calib, args.output_dir, max_memory=args.max_memory, dtype=dtype,
                                device=None if args.device == "cpu" else args.device, format=args.model_export,
                                max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                trust_remote_code=args.trust_remote_code, tokenizer=tok)
    except GraphQuantError as e:
        raise CliError(f"streamed quantization failed: {_one_line(e)}", EXIT_ANALYSIS) from e
    per_layer = [u.seconds for u in res.units[1:]] or [0.0]
    print(f"quantized layer by layer in {res.seconds:.1f}s ({len(res.units)} units, "
          f"{sum(per_layer) / len(per_layer):.2f}s per layer): scheme {args.quant_scheme}, pre-optimizations "
          f"{args.pre_quantization_optimization or 'none'}, algorithm {args.quant_algo or 'none'}")
    print(f"  estimated peak {format_bytes(res.estimate['total'])}; measured peak RSS growth "
          f"{format_bytes(res.peak_rss_growth)}" + (f", peak GPU {format_bytes(res.cuda_peak_bytes)}"
                                                     if res.cuda_peak_bytes is not None else ""))
    print(f"saved {res.export['format']} checkpoint to {args.output_dir}")
    for c in res.export.get("caveats", []):
        print(f"  caveat: {c}")
    return EXIT_OK


def _cmd_eval(args) -> int:
    """``graphquant eval``: perplexity of a model (non-overlapping windows)."""
    from .errors import GraphQuantError
    from .eval import perplexity

    model, tok = _load_with_tokenizer(args)
    try:
        windows = _eval_windows(args, tok)
        r = perplexity(model, windows, batch_size=args.batch_size)
    except GraphQuantError as e:
        raise CliError(f"evaluation failed: {_one_line(e)}", EXIT_ANALYSIS) from e
    print(f"perplexity on {args.eval_dataset or 'wikitext'} ({r.num_windows} windows x {windows.shape[1]}): "
          f"{r.ppl:.3f} (loss {r.mean_loss:.5f})")
    return EXIT_OK


def _cmd_generate(args) -> int:
    """``graphquant generate``: greedy (or sampled) text from a model folder, quantized or not."""
    import time

    import torch

    model, tok = _load_with_tokenizer(args)
    enc = tok(args.prompt, return_tensors="pt")
    enc = {k: v.to(args.device) for k, v in enc.items()}
    t0 = time.time()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                             temperature=args.temperature if args.temperature > 0 else None, top_p=None, top_k=None,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    dt = time.time() - t0
    new = out.shape[1] - enc["input_ids"].shape[1]
    print(tok.decode(out[0], skip_special_tokens=True))
    print(f"[{new} new tokens in {dt:.2f}s, {new / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return EXIT_OK


# --- argument parsing ------------------------------------------------------------------------------
def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--model_dir", dest="model", required=True, metavar="PATH_OR_HUB_ID",
                   help="a Hugging Face model folder, a llama2.c checkpoint (folder or .bin), or a hub id")
    p.add_argument("--trust_remote_code", action="store_true", help="allow custom model code from the hub")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval_dataset", choices=["wikitext", "gutenberg"], default=None,
                   help="evaluation text (default: the shipped WikiText-2 test split)")
    p.add_argument("--eval_windows", type=int, default=None, help="evaluate on the first N windows (default: all)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="graphquant", description="graph-based post-training quantization "
                                     "of LLMs: find what can be smoothed and rotated, quantize, evaluate")
    parser.add_argument("--version", action="version", version=f"graphquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{report,quantize,eval,generate}")
    sub.required = True

    rep = sub.add_parser("report", help="report which layers can be smoothed / rotated (R1-R4) and why not",
                         description="Capture the model with torch.export, find its patterns and print the "
                                     "rotatable-patterns report.")
    _add_model_arg(rep)
    rep.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    rep.add_argument("--dot", metavar="FILE", help="also write the pattern graph as Graphviz text")
    rep.set_defaults(func=_cmd_report)

    # flags follow Quark's quantize_quark.py
    q = sub.add_parser("quantize", help="quantize a model (Quark-style flags)")
    _add_model_arg(q)
    q.add_argument("--quant_scheme", help="scheme name, e.g. w_int8_a_int8_per_tensor_sym")
    q.add_argument("--pre_quantization_optimization", action="append",
                   choices=["smoothquant", "rotation", "quarot"], help="may be repeated")
    q.add_argument("--quant_algo", choices=["awq", "gptq", "autosmoothquant"])
    q.add_argument("--exclude_layers", nargs="*", default=None, help="module name globs to leave in float")
    q.add_argument("--group_size", type=int)
    q.add_argument("--kv_cache_dtype")
    q.add_argument("--dataset")
    q.add_argument("--num_calib_data", type=int)
    q.add_argument("--seq_len", type=int)
    q.add_argument("--output_dir", help="write a checkpoint here (refused: the input folder, or a non-empty folder "
                   "graphquant did not write unless --overwrite)")
    q.add_argument("--model_export", choices=["compressed-tensors", "quark", "hf_format"], default="compressed-tensors",
                   help="checkpoint format of --output_dir (hf_format is Quark's name for quark)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir graphquant did not write")
    q.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    q.add_argument("--max_memory", default=None, help="stream the model layer by layer within this budget "
                   "(accelerate's convention, e.g. cuda=8GiB,cpu=16GiB); needs a local folder and --output_dir")
    q.add_argument("--eval_ppl", action="store_true", help="print FP and quantized perplexity side by side")
    q.add_argument("--lower", action="store_true", help="lower Q/DQ + linear to low-precision kernels")
    _add_eval_args(q)
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser("eval", help="evaluate a model (perplexity)")
    _add_model_arg(e)
    e.add_argument("--seq_len", type=int)
    _add_eval_args(e)
    e.set_defaults(func=_cmd_eval)

    gen = sub.add_parser("generate", help="generate text from a model (a saved quantized folder or any HF model)")
    _add_model_arg(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max_new_tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--kernels", choices=["auto", "always", "never"], default="auto",
                     help="quantized Linears: low-precision kernels where faster on this device (auto), wherever "
                          "one exists (always), or fake-quant, bit-identical to graphquant's graph (never)")
    gen.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse usage errors raise SystemExit(2))."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"graphquant {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("graphquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
