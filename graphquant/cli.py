"""The ``graphquant`` command line: ``report`` | ``quantize`` | ``eval`` | ``generate``.

``graphquant report --model PATH_OR_HUB_ID [--json FILE] [--dot FILE]`` prints which layers can be
smoothed and rotated (and why not), and optionally writes the report as JSON and Graphviz text.

Exit codes: 0 success; 1 the model loaded but could not be analysed; 2 bad usage, or a model that
cannot be loaded (missing path, unreachable hub id, unreadable checkpoint). Errors are one clear
message on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
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


_KV_CACHE = {  # --kv_cache_dtype (Quark's names) -> (dtype, qscheme, is_dynamic)
    "int8": ("int8", "per_tensor", False), "int8_per_tensor_static": ("int8", "per_tensor", False),
    "int8_per_tensor_dynamic": ("int8", "per_tensor", True), "int8_per_token": ("int8", "per_token", True),
    "fp8": ("fp8", "per_tensor", False), "fp8_dynamic": ("fp8", "per_tensor", True),
}
_PRE_QUANT = ("smoothquant", "rotation", "quarot")
_ALGOS = ("awq", "gptq", "autosmoothquant")


def build_config(args):
    """The graphquant Config the quantize flags describe (Quark's quantize_quark.py flags).

    ``--quant_algo`` takes Quark's comma-separated list: smoothquant / rotation / quarot become
    pre-quantization rewrites (as ``--pre_quantization_optimization``), awq / gptq / autosmoothquant
    algorithms. ``--exclude_layers`` replaces the preset's ``["*lm_head"]``; the bare flag excludes nothing.
    """
    from . import config as C

    if not args.quant_scheme:
        raise CliError("--quant_scheme is required, e.g. w_int8_per_tensor_a_int8_per_tensor; known: "
                       + ", ".join(C.list_presets()), EXIT_USAGE)
    try:
        cfg = C.preset(args.quant_scheme)
        if args.group_size is not None:
            g = cfg.global_quant_config
            if g.weight is None or g.weight.is_cast:
                raise CliError(f"--group_size needs a scheme with quantized weights; {args.quant_scheme} has none",
                               EXIT_USAGE)
            if g.weight.is_mx:
                raise CliError(f"--group_size does not apply to MX scheme {args.quant_scheme} (blocks of 32 are part "
                               "of the format); drop --group_size", EXIT_USAGE)
            # re-derive the defaults (observer, axis) of a per-group spec: the preset's per-channel
            # observer does not apply to groups
            w = g.weight.evolve(qscheme=C.QSchemeType.per_group, group_size=args.group_size, ch_axis=None,
                                observer_cls=None)
            cfg = dataclasses.replace(cfg, global_quant_config=dataclasses.replace(g, weight=w))
        algos = list(args.quant_algo or [])
        pre_names = list(args.pre_quantization_optimization or []) + [a for a in algos if a in _PRE_QUANT]
        pre = [{"smoothquant": C.SmoothQuantConfig, "rotation": C.RotationConfig,
                "quarot": C.QuaRotConfig}[name]() for name in dict.fromkeys(pre_names)]
        algo_cfgs = [{"autosmoothquant": C.AutoSmoothQuantConfig, "gptq": C.GPTQConfig,
                      "awq": C.AWQConfig}[a]() for a in dict.fromkeys(algos) if a in _ALGOS]
        if getattr(args, "sink_tokens", 0):
            algo_cfgs.append(C.SinkTokenConfig(num_tokens=args.sink_tokens))
        exclude = cfg.exclude if args.exclude_layers is None else list(args.exclude_layers)
        cfg = dataclasses.replace(cfg, pre_quant_opt_config=pre, algo_config=algo_cfgs or None, exclude=exclude)
        if args.kv_cache_dtype:
            dtype, qscheme, dynamic = _KV_CACHE[args.kv_cache_dtype]
            cfg = C.with_kv_cache(cfg, dtype, qscheme=qscheme, is_dynamic=dynamic)
    except C.ConfigError as e:
        raise CliError(_one_line(e), EXIT_USAGE) from e
    return cfg


def _calibration_data(args, tok, model):
    """Calibration batches as the flags say (warns when --seq_len exceeds the model's context)."""
    from .datasets import calibration_batches
    from .log import logger

    seq_len = args.seq_len or 512
    ctx_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(ctx_len, int) and seq_len > ctx_len:
        print(f"graphquant quantize: warning: --seq_len {seq_len} is longer than the model's context "
              f"({ctx_len} positions); calibration runs positions it was never trained on. Use --seq_len {ctx_len} "
              "or less", file=sys.stderr)
    logger.info("calibration data: %d windows of %d tokens from %s, batches of %d", args.num_calib_data or 16,
                seq_len, args.dataset or "wikitext", args.calib_batch_size)
    calib = calibration_batches(tok, args.dataset or "wikitext", num_calib_data=args.num_calib_data or 16,
                                seq_len=seq_len, batch_size=args.calib_batch_size)
    return [{k: v.to(args.device) for k, v in b.items()} for b in calib]


def _print_lowering(args, qmodel) -> None:
    """What --lower did, in one line."""
    low = qmodel.lowering
    if not args.lower or not low:
        return
    reasons = sorted({e["reason"].split(" (")[0].split(";")[0] for e in low["fake_quant"]})
    print(f"  lowering ({low.get('device')}): {len(low['lowered'])} Linears on kernels, {len(low['fake_quant'])} "
          f"kept fake-quant" + (f" ({'; '.join(reasons[:3])})" if reasons else ""))


def _print_kv_cache(args, qmodel) -> None:
    """What --kv_cache_dtype did, in one line."""
    if not args.kv_cache_dtype:
        return
    sites = [e for e in qmodel.log if e.get("action") == "quantize_activation" and str(e.get("role")).startswith("kv")]
    spec = qmodel.quant_config.kv_cache_quant_config
    if sites:
        print(f"  KV cache: {len(sites)} tensors (K after RoPE, V) quantized as {spec.to_op_str()} "
              f"(--kv_cache_dtype {args.kv_cache_dtype})")
    else:
        print(f"  KV cache: --kv_cache_dtype {args.kv_cache_dtype} found no attention K/V site in this model; "
              "nothing was quantized there")


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
    from .errors import GraphQuantError

    cfg = build_config(args)
    from .advice import config_advice

    for note in config_advice(cfg):
        print(f"graphquant quantize: note: {note}", file=sys.stderr)
    _check_output_dir(args)
    if getattr(args, "max_memory", None):
        return _cmd_quantize_streamed(args, cfg)
    model, tok = _load_with_tokenizer(args)
    try:
        calib = _calibration_data(args, tok, model)
        t0 = time.time()
        if args.auto_exclude:
            from .sensitivity import auto_exclude, format_sensitivity

            qmodel, ranked = auto_exclude(model, cfg, calib, args.auto_exclude, lower=args.lower,
                                          windows=calib[0]["input_ids"])
            print(format_sensitivity(ranked, max(args.auto_exclude, 5)))
            print(f"excluded the {args.auto_exclude} costliest layer(s): {[r.fqn for r in ranked[:args.auto_exclude]]}")
        else:
            qmodel = quantize(model, cfg, calib, lower=args.lower)
        pre = ", ".join(a.name for a in cfg.pre_quant_opt_config) or "none"
        algos = ", ".join(a.name for a in cfg.algo_config or []) or "none"
        print(f"quantized in {time.time() - t0:.1f}s: scheme {args.quant_scheme}, "
              f"pre-optimizations {pre}, algorithm {algos}, excluded {cfg.exclude or 'nothing'}")
        for line in qmodel.plan.describe():
            print("  " + line)
        _print_kv_cache(args, qmodel)
        _print_lowering(args, qmodel)
        if args.eval_ppl and not args.skip_evaluation:
            from .eval import perplexity

            windows = _eval_windows(args, tok)
            fp = perplexity(model, windows, batch_size=args.batch_size, progress=True)
            q = perplexity(qmodel, windows, batch_size=args.batch_size, progress=True)
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
        r = perplexity(model, windows, batch_size=args.batch_size, progress=True)
    except GraphQuantError as e:
        raise CliError(f"evaluation failed: {_one_line(e)}", EXIT_ANALYSIS) from e
    print(f"perplexity on {args.eval_dataset or 'wikitext'} ({r.num_windows} windows x {windows.shape[1]}): "
          f"{r.ppl:.3f} (loss {r.mean_loss:.5f})")
    return EXIT_OK


# --- argument parsing and validation ---------------------------------------------------------------
def _int_at_least(lowest: int):
    """argparse type: an integer >= ``lowest`` (0 is not "unset": below the bound it is refused)."""
    what = "a positive integer (>= 1)" if lowest == 1 else f"an integer >= {lowest}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < lowest:
            raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
        return v

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _algo_list(text: str) -> list[str]:
    """argparse type of --quant_algo: Quark's comma-separated list of algorithms."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in _PRE_QUANT + _ALGOS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown algorithm(s) {bad or [text]}; choose from "
                                         f"{', '.join(_ALGOS + _PRE_QUANT)} (comma-separated)")
    return names


def _check_device(device: str) -> None:
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N", EXIT_USAGE) from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
            raise CliError(f"--device {device}: {why}; use --device cpu", EXIT_USAGE)
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise CliError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible "
                           f"(cuda:0..cuda:{torch.cuda.device_count() - 1})", EXIT_USAGE)
    elif d.type not in ("cpu", "cuda"):
        raise CliError(f"--device {device}: graphquant runs on cpu or cuda", EXIT_USAGE)


_NAMED_DATASETS = ("wikitext", "wikitext2", "gutenberg")


def _check_dataset(name: str | None, flag: str) -> None:
    if name is None:
        return
    key = name.lower().replace("-", "").replace("_", "")
    if key in _NAMED_DATASETS or key == "wikitext2raw":
        return
    if Path(name).expanduser().is_file():
        return
    if key.startswith("pileval") or key.startswith("wikitextfor"):
        raise CliError(f"{flag} {name}: Quark's named datasets are downloaded from the hub, which graphquant does "
                       "not do; pass a local text file instead (a .txt, or a .jsonl with a \"text\" field per line)",
                       EXIT_USAGE)
    raise CliError(f"{flag} {name!r}: not a file, and not one of {', '.join(_NAMED_DATASETS)}; pass a path to a "
                   ".txt or .jsonl file", EXIT_USAGE)


def validate_args(args) -> None:
    """Checks that need no model, run before anything is loaded; each failure is one line (exit 2)."""
    if getattr(args, "device", None) is not None:
        _check_device(args.device)
    if args.command == "quantize":
        build_config(args)  # scheme, group size, algorithms: all checked before the model loads
        _check_dataset(args.dataset, "--dataset")
        if args.custom_mode != "quark":
            print(f"graphquant quantize: note: --custom_mode {args.custom_mode} is accepted for Quark compatibility; "
                  "graphquant writes the checkpoint format chosen by the scheme and the export options",
                  file=sys.stderr)
        if args.eval_ppl and args.skip_evaluation:
            print("graphquant quantize: note: --skip_evaluation given: no perplexity evaluation", file=sys.stderr)


def _cmd_generate(args) -> int:
    """``graphquant generate``: greedy (or sampled) text from a model folder, quantized or not."""
    import time

    import torch

    if args.fast and args.temperature > 0:
        raise CliError("--fast generates greedily: drop --temperature (or drop --fast to sample)", EXIT_USAGE)
    model, tok = _load_with_tokenizer(args)
    enc = tok(args.prompt, return_tensors="pt")
    enc = {k: v.to(args.device) for k, v in enc.items()}
    if args.fast:
        return _generate_fast(args, model, tok, enc["input_ids"])
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


def _generate_fast(args, model, tok, ids) -> int:
    """``--fast``: graphquant.generation.prepare (kernels, fused projections, decode attention) and a
    static-cache decoder, compiled and replayed as a CUDA graph on CUDA (greedy)."""
    import torch

    from .export.qlinear import QuantLinear
    from .generation import PrepareError, prepare
    from .static_decode import StaticDecoder

    if any(isinstance(m, QuantLinear) for m in model.modules()):
        try:
            prepare(model)
        except PrepareError as e:
            raise CliError(f"--fast: {_one_line(e)}; run without --fast", EXIT_USAGE) from e
    cuda = ids.is_cuda
    if cuda:
        from . import decode_attention  # float models too (prepare already switched the quantized ones)

        decode_attention.use_if_sdpa(model)
    dec = StaticDecoder(model, batch_size=1, max_length=ids.shape[1] + args.max_new_tokens, compile=cuda,
                        cuda_graph=cuda)
    with torch.no_grad():
        out = dec.generate(ids, args.max_new_tokens)
    new = out[0, ids.shape[1]:]
    eos = tok.eos_token_id
    stop = (new == eos).nonzero() if eos is not None else new.new_empty((0, 1))
    if len(stop):
        new = new[: int(stop[0, 0]) + 1]
    print(tok.decode(torch.cat([ids[0], new]), skip_special_tokens=True))
    timing = dec.last_timing
    steps = args.max_new_tokens - 1
    rate = f", decode {steps / (timing['decode_ms'] / 1e3):.1f} tokens/s" if steps and timing.get("decode_ms") else ""
    print(f"[{len(new)} new tokens; first call {timing['total_ms'] / 1e3:.2f}s"
          f"{' including compilation' if cuda else ''}{rate}]", file=sys.stderr)
    return EXIT_OK


# --- argument parsing: parser ------------------------------------------------------------------------------
def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--model_dir", dest="model", required=True, metavar="PATH_OR_HUB_ID",
                   help="a Hugging Face model folder, a .gguf file, a llama2.c checkpoint (folder or .bin), "
                   "or a hub id")
    p.add_argument("--trust_remote_code", action="store_true", help="allow custom model code from the hub")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval_dataset", choices=["wikitext", "gutenberg"], default=None,
                   help="evaluation text (default: the shipped WikiText-2 test split)")
    p.add_argument("--eval_windows", type=_positive_int, default=None,
                   help="evaluate on the first N windows (default: all)")
    p.add_argument("--batch_size", type=_positive_int, default=8, help="evaluation batch size (windows)")
    p.add_argument("--dtype", "--data_type", dest="dtype", choices=["float32", "bfloat16", "float16"],
                   default="float32", help="model dtype (--data_type is Quark's name)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (checked before the model loads)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import list_presets

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
    q.add_argument("--quant_scheme", metavar="SCHEME",
                   help="scheme name, e.g. w_int8_a_int8_per_tensor_sym; one of: " + ", ".join(list_presets()))
    q.add_argument("--pre_quantization_optimization", action="append",
                   choices=list(_PRE_QUANT), help="may be repeated")
    q.add_argument("--quant_algo", type=_algo_list, metavar="ALG1,ALG2",
                   help="comma-separated: " + ", ".join(_ALGOS + _PRE_QUANT) + " (smoothquant / rotation / quarot "
                   "are the pre-quantization rewrites)")
    q.add_argument("--exclude_layers", nargs="*", default=None,
                   help="module name globs to leave in float (default: '*lm_head', as Quark; the bare flag "
                   "excludes nothing)")
    q.add_argument("--group_size", type=_positive_int, help="weight group size (makes the weights per-group)")
    q.add_argument("--kv_cache_dtype", choices=list(_KV_CACHE), help="quantize the KV cache (K after RoPE, V)")
    q.add_argument("--dataset", help="calibration text: wikitext (default), gutenberg, or a path to a .txt file "
                   "(or a .jsonl with a \"text\" field per line)")
    q.add_argument("--num_calib_data", type=_positive_int, default=16, help="calibration windows (default 16)")
    q.add_argument("--calib_batch_size", type=_positive_int, default=4,
                   help="calibration batch size (windows per forward pass; default 4)")
    q.add_argument("--seq_len", type=_positive_int, default=512, help="tokens per window (default 512)")
    q.add_argument("--output_dir", help="write a checkpoint here (refused: the input folder, or a non-empty folder "
                   "graphquant did not write unless --overwrite)")
    q.add_argument("--model_export", choices=["compressed-tensors", "quark", "hf_format"], default="compressed-tensors",
                   help="checkpoint format of --output_dir (hf_format is Quark's name for quark)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir graphquant did not write")
    q.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    q.add_argument("--max_memory", default=None, help="stream the model layer by layer within this budget "
                   "(accelerate's convention, e.g. cuda=8GiB,cpu=16GiB); needs a local folder and --output_dir")
    q.add_argument("--eval_ppl", action="store_true", help="print FP and quantized perplexity side by side")
    q.add_argument("--skip_evaluation", action="store_true", help="no evaluation (Quark's flag; overrides --eval_ppl)")
    q.add_argument("--custom_mode", choices=["quark", "awq", "fp8"], default="quark",
                   help="accepted for Quark compatibility")
    q.add_argument("--lower", action="store_true",
                   help="lower Q/DQ + linear to low-precision kernels (on CPU only where measured faster)")
    q.add_argument("--sink_tokens", type=_non_negative_int, default=0, metavar="N",
                   help="keep the first N tokens (attention sink) out of static activation scales (SinkTokenConfig)")
    q.add_argument("--auto_exclude", type=_non_negative_int, default=0, metavar="K",
                   help="measure each layer's loss contribution on calibration data and leave the K costliest in float")
    _add_eval_args(q)
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser("eval", help="evaluate a model (perplexity)")
    _add_model_arg(e)
    e.add_argument("--seq_len", type=_positive_int, default=512, help="tokens per window (default 512)")
    _add_eval_args(e)
    e.set_defaults(func=_cmd_eval)

    gen = sub.add_parser("generate", help="generate text from a model (a saved quantized folder or any HF model)")
    _add_model_arg(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max_new_tokens", type=_positive_int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--kernels", choices=["auto", "always", "never"], default="auto",
                     help="quantized Linears: low-precision kernels where faster on this device (auto), wherever "
                          "one exists (always), or fake-quant, bit-identical to graphquant's graph (never)")
    gen.add_argument("--fast", action="store_true",
                     help="greedy decoding with a static KV cache: quantized models are prepared for generation "
                          "(kernels, fused q|k|v and gate|up); on CUDA the decode step is compiled and replayed as a "
                          "CUDA graph (the first call includes the compilation)")
    gen.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse usage errors raise SystemExit(2))."""
    import warnings

    args = build_parser().parse_args(argv)
    previous = warnings.formatwarning
    # warnings as one line each, like errors (no source line, no file position)
    warnings.formatwarning = lambda message, category, *_a, **_k: f"graphquant: warning: {_one_line(message)}\n"
    try:
        return _run(args)
    finally:
        warnings.formatwarning = previous


def _run(args) -> int:
    """Dispatch ``args`` and turn every failure into one line on stderr and an exit status."""
    import os

    from .errors import GraphQuantError

    try:
        validate_args(args)
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"graphquant {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("graphquant: interrupted", file=sys.stderr)
        return 130
    except GraphQuantError as e:
        print(f"graphquant {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ANALYSIS
    except Exception as e:  # noqa: BLE001 - never a traceback for a user; GRAPHQUANT_DEBUG=1 shows it
        if os.environ.get("GRAPHQUANT_DEBUG"):
            raise
        print(f"graphquant {args.command}: error: unexpected {type(e).__name__}: {_one_line(e)[:500]} "
              "(set GRAPHQUANT_DEBUG=1 to see the traceback, and please report it)", file=sys.stderr)
        return EXIT_ANALYSIS


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
