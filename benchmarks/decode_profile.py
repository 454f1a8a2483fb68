"""Where a decode step's time goes: the GPU kernels of one graph-replayed step, per variant (issue 13).

    PYTHONPATH=. python benchmarks/decode_profile.py [--variants "bf16,int8 W8A8,W4A16 g128"] [--batch 1]
        [--layers 2] [--sdpa "default;efficient_attention;math"] [--inductor "default;split_reductions=0"]
        [--prefill 8,2048] [--out benchmarks/results/decode_profile.json]

Builds the same 2-layer Llama-3-8B-shaped model and variants as ``generate_gpu.py``, runs one
:class:`graphquant.static_decode.StaticDecoder` step (compiled, CUDA graph) under
``torch.profiler`` for ``--steps`` replays and prints, per variant, the kernels of one step:
name, launches per step, microseconds per step, and the sum of kernel time against the replay's
CUDA-event time (the difference is the gap between kernels inside the graph and, between replays, the graph's
own launch; since 2026-12-01 the step time is per replay of ten queued back to back, ``step_ms``, with the old
time of one replay timed on its own beside it, ``step_ms_synced``, and the span of one step's kernels,
``span_us``), the time by kind of kernel (``category``), and the last step's kernels in the order they ran, with
their start times (``sequence``: where a kernel sits in the layer, which gap follows it). ``--sdpa`` repeats each
variant with the decode step restricted to other attention backends (``StaticDecoder(sdpa=...)``),
``--inductor`` with other Inductor options for the step's compile (``StaticDecoder(compile_options=...)``).
``--prefill B,L`` profiles the compiled prefill of a B x L prompt instead (no CUDA graph; "step" then means one
prefill). Kernel names are shortened (Triton's generated
names keep their fused-op suffixes). CUDA only.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import generate_gpu as gg  # noqa: E402


def _variant(spec: str) -> gg.Variant:
    """"bf16", "bf16 + decode attention", "[torchao ]<scheme>[ + QuaRot][ + sdpa]" (graphquant rows run prepare's
    decode attention unless " + sdpa")."""
    spec = spec.strip()
    if spec.startswith("bf16"):
        return gg.Variant("bf16", "bf16", attention="decode" if spec.endswith("+ decode attention") else "sdpa")
    who = "torchao" if spec.startswith("torchao ") else "graphquant"
    name = spec.removeprefix("torchao ").strip()
    attention = "sdpa" if name.endswith("+ sdpa") else "default"
    name = name.removesuffix("+ sdpa").strip()
    quarot = name.endswith("+ QuaRot")
    scheme = name.removesuffix("+ QuaRot").strip()
    if scheme not in gg.GQ_SCHEMES:
        raise SystemExit(f"unknown variant {spec!r}; schemes: {', '.join(gg.GQ_SCHEMES)} (prefix 'torchao ', "
                         "suffixes ' + QuaRot', ' + sdpa'), or 'bf16', 'bf16 + decode attention'")
    return gg.Variant(who, scheme, quarot, attention=attention)


#: kernel-name substrings -> what the kernel does (first match wins; Inductor's fused names list their ops)
CATEGORIES = (("matmul", ("wq_mm", "gemv", "nvjet", "tinygemm", "gemm", "cutlass", "splitKreduce", "_scaled_mm")),
              ("attention", ("sdpa", "attention", "flash")),  # graphquant's decode_attention_* kernels too
              ("hadamard", ("_persistent_kernel", "_factored_kernel", "_dense_kernel", "hadamard")),
              ("argmax", ("argmax",)),
              ("norm (+quant)", ("rsqrt",)),
              ("activation quant", ("amax", "quant")),
              ("rope / cache", ("cos", "sin", "index_copy", "index_put")))


def category(name: str) -> str:
    return next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")


def _short(name: str) -> str:
    return name if len(name) <= 90 else name[:87] + "..."


@torch.no_grad()
def profile_variant(model, v: gg.Variant, setup: gg.Setup, calib, batch: int, steps: int,
                    sdpa_options=(None,), inductor_options=(None,), prefill=None) -> list[dict]:
    """One result per SDPA option (None: torch's choice) and Inductor option set (None: the defaults); the
    variant is built once."""
    m = gg.build(model, v, setup, calib)
    out = []
    for sdpa in sdpa_options:
        for opts in inductor_options:
            try:
                out.append(_profile_step(m, v, setup, batch, steps, sdpa, opts, prefill))
            except Exception as e:  # noqa: BLE001 - a backend that cannot run this attention is reported
                print(f"{v.who} {v.name} sdpa={sdpa} inductor={opts}: failed: {type(e).__name__}: {str(e)[:300]}",
                      flush=True)
            torch._dynamo.reset()
    del m
    torch.cuda.empty_cache()
    return out


@torch.no_grad()
def _profile_step(m, v: gg.Variant, setup: gg.Setup, batch: int, steps: int, sdpa, inductor=None,
                  prefill=None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from graphquant.static_decode import StaticDecoder

    if prefill:  # the compiled prefill of a (batch, length) prompt instead of a decode step
        bp, lp = prefill
        dec = StaticDecoder(m, bp, lp + 8, cuda_graph=False)
        ids = torch.randint(0, setup.vocab, (bp, lp), device="cuda")
        step_ms = dec.time_prefill_ms(ids, 5)
        synced_ms = None
        batch = bp

        def replay():
            dec.prefill(ids)
    else:
        dec = StaticDecoder(m, batch, setup.max_length, sdpa=sdpa, compile_options=inductor)
        prompt = torch.randint(0, setup.vocab, (batch, setup.prompt), device="cuda")
        dec.generate(prompt, 8)
        # ten replays queued back to back per sample, as generate() runs its steps (generate_gpu.py from run t on);
        # the old timing (each replay on its own, the GPU idle until the CPU submitted it) beside it
        step_ms = dec.time_step_ms(100, position=setup.prompt + 64, replays=10)
        synced_ms = dec.time_step_ms(100, position=setup.prompt + 64)
        replay = dec._graph.replay
    for _ in range(5 if not prefill else 1):
        replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            replay()
        torch.cuda.synchronize()
    per = collections.defaultdict(lambda: [0, 0.0])
    cuda = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                  key=lambda e: e.time_range.start)
    for e in cuda:
        per[e.name][0] += 1
        per[e.name][1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    kernels = sorted(({"kernel": k, "launches": c / steps, "us": t / steps} for k, (c, t) in per.items()),
                     key=lambda d: -d["us"])
    per_step = round(sum(k["launches"] for k in kernels))
    # one step's kernels in the order they ran (the last full step), with their start relative to the first
    last = cuda[-per_step:] if per_step else []
    sequence = [{"kernel": e.name, "start_us": e.time_range.start - last[0].time_range.start,
                 "us": e.time_range.elapsed_us()} for e in last]
    del dec
    cats = collections.defaultdict(float)
    for k in kernels:
        cats[category(k["kernel"])] += k["us"]
    return {"variant": f"{v.who} {v.name}" + (" + sdpa" if v.who != "bf16" and v.attention == "sdpa" else ""),
            "what": f"prefill {prefill[0]}x{prefill[1]}" if prefill else "decode step",
            "sdpa": "default" if sdpa is None else ",".join(sdpa),
            "inductor": inductor or {}, "batch": batch, "step_ms": step_ms, "step_ms_synced": synced_ms,
            "span_us": sequence[-1]["start_us"] + sequence[-1]["us"] if sequence else None,
            "kernel_us": sum(k["us"] for k in kernels),
            "launches": sum(k["launches"] for k in kernels),
            "categories_us": dict(sorted(cats.items(), key=lambda kv: -kv[1])), "kernels": kernels,
            "sequence": sequence}


def _print(r: dict, top: int) -> None:
    what = r.get("what", "decode step")
    print(f"\n== {r['variant']}  {what}  sdpa {r['sdpa']}  "
          f"inductor {r.get('inductor') or 'default'}  batch {r['batch']}: step {r['step_ms'] * 1e3:.1f} us "
          f"({'graph replay' if what == 'decode step' else 'compiled, no graph'}), "
          f"kernels {r['kernel_us']:.1f} us in {r['launches']:.0f} launches, "
          f"gaps {r['step_ms'] * 1e3 - r['kernel_us']:.1f} us"
          + (f"; one replay timed on its own {r['step_ms_synced'] * 1e3:.1f} us" if r.get("step_ms_synced") else "")
          + (f"; one step's first kernel start to last kernel end {r['span_us']:.1f} us" if r.get("span_us") else ""),
          flush=True)
    print("   by kind (us/step): " + ", ".join(f"{c} {us:.1f}" for c, us in r["categories_us"].items()))
    print(f"{'us/step':>9} {'launches':>8}  kernel")
    for k in r["kernels"][:top]:
        print(f"{k['us']:9.2f} {k['launches']:8.1f}  {_short(k['kernel'])}")
    if r.get("sequence"):
        print("   one step in order (start us, us, kernel):")
        for k in r["sequence"]:
            print(f"   {k['start_us']:8.1f} {k['us']:7.2f}  {_short(k['kernel'])}")


def sdpa_options(text: str) -> list:
    """``'default;efficient_attention;flash_attention,math'`` -> [None, ('efficient_attention',), ...]."""
    return [None if o.strip() == "default" else tuple(b.strip() for b in o.split(",") if b.strip())
            for o in text.split(";") if o.strip()]


def inductor_options(text: str) -> list:
    """``'default;split_reductions=0'`` -> [None, {'split_reductions': False}] (values: ints, 0/1 as booleans for
    names Inductor's config holds as booleans, or strings)."""
    from torch._inductor import config

    out = []
    for part in text.split(";"):
        part = part.strip()
        if part == "default":
            out.append(None)
        if part in ("", "default"):
            continue
        opts = {}
        for kv in part.split(","):
            k, _, val = kv.partition("=")
            k, val = k.strip(), val.strip()
            if not hasattr(config, k):
                raise SystemExit(f"--inductor: {k!r} is not an Inductor config option")
            cur = getattr(config, k)
            if isinstance(cur, int) and not isinstance(cur, bool) and not val.lstrip("-").isdigit():
                raise SystemExit(f"--inductor: {k} takes an integer, got {val!r}")
            opts[k] = (val not in ("0", "false", "False")) if isinstance(cur, bool) else \
                (int(val) if isinstance(cur, int) else val)
        out.append(opts)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="bf16,int8 W8A8,fp8 dynamic,W8A16,W4A16 g128")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--sdpa", default="default",
                    help="';'-separated SDPA backend sets for the decode step, each a ','-separated list of "
                         "torch.nn.attention.SDPBackend names, e.g. 'default;efficient_attention;math'")
    ap.add_argument("--inductor", default="default",
                    help="';'-separated Inductor option sets for the decode step's compile, each 'name=value,...', "
                         "e.g. 'default;split_reductions=0'")
    ap.add_argument("--prefill", default="", metavar="B,L",
                    help="profile the compiled prefill of a B x L prompt instead of a decode step, e.g. 8,2048 "
                         "(--steps prefills; --batch, --sdpa and --inductor do not apply)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_profile.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_profile.py needs a CUDA GPU")
    prefill = None
    if args.prefill:
        try:
            prefill = tuple(int(v) for v in args.prefill.split(","))
            assert len(prefill) == 2 and min(prefill) > 0
        except (ValueError, AssertionError):
            raise SystemExit(f"--prefill {args.prefill!r}: give B,L (two positive integers), e.g. 8,2048") from None
    options = sdpa_options(args.sdpa)
    inductor = inductor_options(args.inductor)
    setup = gg.Setup()
    model = gg.llama3_8b(setup, args.layers)
    calib = [torch.randint(0, setup.vocab, (1, 256), device="cuda") for _ in range(2)]
    results = []
    for spec in args.variants.split(","):
        if not spec.strip():
            continue
        v = _variant(spec)
        try:
            rs = profile_variant(model, v, setup, calib, args.batch, args.steps, options, inductor, prefill)
        except Exception as e:  # noqa: BLE001 - one variant's failure is reported, the others run
            print(f"{spec}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        for r in rs:
            results.append(r)
            _print(r, args.top)
        gg.write_json(args.out, {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                 "layers": args.layers, "results": results})


if __name__ == "__main__":
    main()
