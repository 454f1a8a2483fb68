"""The ``graphquant`` command line: ``report`` | ``quantize`` | ``eval``.

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


# --- quantize / eval: filled in by the quantization work ---------------------------------------------
def _cmd_quantize(args) -> int:
    """``graphquant quantize``: NOT YET AVAILABLE (placeholder for the quantization pipeline)."""
    raise SystemExit("graphquant quantize: not yet available")


def _cmd_eval(args) -> int:
    """``graphquant eval``: NOT YET AVAILABLE (placeholder for perplexity / fidelity evaluation)."""
    raise SystemExit("graphquant eval: not yet available")


# --- argument parsing ------------------------------------------------------------------------------
def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--model_dir", dest="model", required=True, metavar="PATH_OR_HUB_ID",
                   help="a Hugging Face model folder, a llama2.c checkpoint (folder or .bin), or a hub id")
    p.add_argument("--trust_remote_code", action="store_true", help="allow custom model code from the hub")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="graphquant", description="graph-based post-training quantization "
                                     "of LLMs: find what can be smoothed and rotated, quantize, evaluate")
    parser.add_argument("--version", action="version", version=f"graphquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{report,quantize,eval}")
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
    q.add_argument("--output_dir")
    q.add_argument("--eval_ppl", action="store_true")
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser("eval", help="evaluate a model (perplexity)")
    _add_model_arg(e)
    e.add_argument("--dataset")
    e.add_argument("--seq_len", type=int)
    e.set_defaults(func=_cmd_eval)
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
