"""How much a decode step's time depends on the build of its decoder, against how much it moves between rounds.

    PYTHONPATH=. python benchmarks/build_spread.py [--variants "fp8 static,fp8 static + QuaRot"] [--builds 3]
        [--rounds 6] [--out benchmarks/results/build_spread.json]

``generate_gpu.py``'s goal checks compare one build of each row (quantized, prepared, compiled, captured into a
CUDA graph) with one build of another; its alternating rounds (``interleave``) take out the GPU's drift over the
run, but not what one build has that another of the same row lacks (where its tensors and its graph's memory pool
sit, what Inductor chose). Here each variant (names as in ``decode_profile.py``: "bf16", "<scheme>[ + QuaRot]") is
built ``--builds`` times from the same random model, each build's batch-1 decoder kept; then ``--rounds`` rounds time
every kept decoder's step (back-to-back replays, as ``generate_gpu.py``), the order rotated round by round.
Printed per build: the median step (us); per variant: the spread of the build medians (max - min, in % of
their mean) against the median spread of one build over the rounds; for each "X" / "X + QuaRot" pair, QuaRot's
decode cost per layer (head subtracted, the head compiled with the step's options) from every pairing of
builds. CUDA only.

Finding (H200, 2026-12-01, ``results/build_spread.json``, 3 builds, 6 rounds): one build's rounds spread by 0.2-0.4%,
the builds of one row by 1.1-2.7% (fp8 static 81.7 / 83.7 / 83.1 us per layer); fp8 static's QuaRot decode cost
1.1-6.3% over the nine pairings of builds, 3.2% from the means. Hence ``generate_gpu.py --builds``.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import decode_profile as dp  # noqa: E402
import generate_gpu as gg  # noqa: E402


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="fp8 static,fp8 static + QuaRot")
    ap.add_argument("--builds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "build_spread.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("build_spread.py needs a CUDA GPU")
    if args.builds < 1 or args.rounds < 1:
        raise SystemExit(f"build_spread.py: --builds and --rounds take a count >= 1, got {args.builds}, {args.rounds}")
    setup = gg.Setup()
    model = gg.llama3_8b(setup, args.layers)
    calib = [torch.randint(0, setup.vocab, (1, 256), device=setup.device) for _ in range(2)]
    position = gg._decode_position(setup)
    kept, heads = [], {}
    for spec in [s.strip() for s in args.variants.split(",") if s.strip()]:
        decoders = gg.extra_builds(model, dp._variant(spec), setup, calib, decode=args.builds, prefill=0)["decode_b1"]
        for b, dec in enumerate(decoders):
            options = dict(dec.decode_compile_options or {})
            key = repr(sorted(options.items()))
            if key not in heads:
                heads[key] = gg.time_head(dec.model, setup, options)["decode_b1_ms"]  # no Dynamo reset with options
            kept.append(dict(variant=spec, build=b, dec=dec, head_ms=heads[key], times=[]))
        torch._dynamo.reset()  # the kept decoders replay their CUDA graphs; the next variant compiles afresh
        print(f"built {spec} x{len(decoders)}", flush=True)
    for i in range(-1, args.rounds):  # one settling round, not recorded (see generate_gpu.interleave)
        order = kept[i % len(kept):] + kept[:i % len(kept)]
        for k in order:
            ms = k["dec"].time_step_ms(setup.step_iters, position=position, replays=setup.step_replays)
            if i >= 0:
                k["times"].append(ms)
    rows = []
    for k in kept:
        med = statistics.median(k["times"])
        rows.append(dict(variant=k["variant"], build=k["build"], step_ms=med, times_ms=k["times"],
                         head_ms=k["head_ms"], layer_ms=(med - k["head_ms"]) / args.layers,
                         round_spread=(max(k["times"]) - min(k["times"])) / med))
        print(f"{k['variant']:32s} build {k['build']}: step {1e3 * med:8.2f} us  per layer "
              f"{1e3 * rows[-1]['layer_ms']:7.2f} us  rounds' spread {100 * rows[-1]['round_spread']:5.2f}%",
              flush=True)
    summary = {}
    for spec in dict.fromkeys(r["variant"] for r in rows):
        layer = [r["layer_ms"] for r in rows if r["variant"] == spec]
        mean = statistics.fmean(layer)
        summary[spec] = dict(layer_ms=layer, mean_layer_ms=mean, build_spread=(max(layer) - min(layer)) / mean,
                             round_spread=statistics.median(r["round_spread"] for r in rows if r["variant"] == spec))
        print(f"{spec:32s} builds' spread {100 * summary[spec]['build_spread']:5.2f}% of {1e3 * mean:.2f} us per "
              f"layer; one build's rounds {100 * summary[spec]['round_spread']:5.2f}%")
    for spec in summary:
        rot = spec + " + QuaRot"
        if rot in summary:
            costs = [q / p - 1 for p, q in itertools.product(summary[spec]["layer_ms"], summary[rot]["layer_ms"])]
            summary[rot]["quarot_costs"] = costs
            summary[rot]["quarot_cost_of_means"] = summary[rot]["mean_layer_ms"] / summary[spec]["mean_layer_ms"] - 1
            print(f"QuaRot's decode cost, {spec}: {100 * min(costs):.1f}% to {100 * max(costs):.1f}% over the "
                  f"{len(costs)} pairings of builds; of the means {100 * summary[rot]['quarot_cost_of_means']:.1f}%")
    gg.write_json(args.out, dict(device=torch.cuda.get_device_name(), torch=torch.__version__, layers=args.layers,
                                 builds=args.builds, rounds=args.rounds, rows=rows, summary=summary))


if __name__ == "__main__":
    main()
