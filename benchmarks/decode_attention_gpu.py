"""Decode attention on the GPU: graphquant's kernel vs HF's compiled sdpa path (issue 13).

    PYTHONPATH=. python benchmarks/decode_attention_gpu.py [--out benchmarks/results/decode_attention_gpu.json]

One query token per sequence over a bf16 static KV cache (Llama-3-8B heads: 32 query / 8 KV heads of 128),
filled to 2/3 of its slots, bool mask as transformers builds it. Each path is ``torch.compile``d and
replayed as a CUDA graph; the CUDA-event median of 200 replays:

- ``sdpa``: what transformers' sdpa backend does under compile: ``repeat_kv`` then
  ``scaled_dot_product_attention`` with the mask (torch picks the kernel);
- ``graphquant``: ``graphquant::decode_attention`` (split-KV Triton kernel + merge, blocks the mask drops
  skipped).

``--splits 1,2,4`` instead times the Triton kernels alone with the chunk count forced (and ``--blocks 32,64`` the
cache positions per inner step), 16 calls on 16 layers' caches in one CUDA graph, per call; the first row of
each case is the default plan (``split_plan``). Cases: the sizes above and ``generate_gpu.py``'s decode step
(cache of 384 slots, 257 filled).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from generate_gpu import write_json  # noqa: E402
from graphquant import decode_attention as DA  # noqa: E402
from graphquant.timing import graphed, median_ms  # noqa: E402


def sdpa_path(q, k, v, mask, scale):
    g = q.shape[1] // k.shape[1]
    b, h, s, d = k.shape
    k = k[:, :, None].expand(b, h, g, s, d).reshape(b, h * g, s, d)
    v = v[:, :, None].expand(b, h, g, s, d).reshape(b, h * g, s, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=scale).transpose(1, 2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_attention_gpu.json"))
    ap.add_argument("--splits", default="", help="comma-separated chunk counts to time against the default plan")
    ap.add_argument("--blocks", default="", help="comma-separated cache positions per inner step (with --splits)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_attention_gpu.py needs a CUDA GPU")
    if args.splits:
        return sweep_splits(args)
    rows = []
    print(f"{'batch':>5s} {'cache':>6s} {'filled':>6s} {'sdpa us':>8s} {'graphquant us':>13s} {'x':>5s} {'max err':>8s}")
    for batch in (1, 16):
        for cache in (384, 4096):
            filled = 2 * cache // 3
            q = torch.randn(batch, 1, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            k, v = (torch.randn(batch, 8, cache, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            mask = torch.zeros(batch, cache, dtype=torch.bool, device="cuda")
            mask[:, :filled] = True
            scale = 128 ** -0.5
            times, outs = {}, {}
            for name, fn in (("sdpa", sdpa_path), ("graphquant", torch.ops.graphquant.decode_attention)):
                step = torch.compile(lambda fn=fn: fn(q, k, v, mask, scale), fullgraph=True, dynamic=False)
                replay, graph = graphed(step)
                times[name] = median_ms(replay, 200, "cuda") * 1e3
                outs[name] = step().float()
                del graph
            err = (outs["sdpa"] - outs["graphquant"]).abs().max().item()
            rows.append({"batch": batch, "cache": cache, "filled": filled, "sdpa_us": times["sdpa"],
                         "graphquant_us": times["graphquant"], "speedup": times["sdpa"] / times["graphquant"],
                         "max_abs_diff": err})
            r = rows[-1]
            print(f"{batch:5d} {cache:6d} {filled:6d} {r['sdpa_us']:8.1f} {r['graphquant_us']:13.1f} "
                  f"{r['speedup']:5.2f} {err:8.1e}", flush=True)
    write_json(args.out, {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows})
    print(f"wrote {args.out}")


def sweep_splits(args):
    from graphquant.kernels import decode_attention_triton as DAT
    from graphquant.timing import graph_us

    try:
        splits = [int(v) for v in args.splits.split(",")]
        blocks = [int(v) for v in args.blocks.split(",")] if args.blocks else [DAT.BLOCK_S]
    except ValueError:
        raise SystemExit(f"decode_attention_gpu.py: --splits and --blocks take comma-separated integers, e.g. "
                         f"--splits 1,2,4 --blocks 32,64; got {args.splits!r}, {args.blocks!r}") from None
    default_block = DAT.BLOCK_S
    layers, rows = 16, []
    print(f"{'batch':>5s} {'cache':>6s} {'filled':>6s} {'block':>5s} {'splits':>6s} {'us/call':>8s} {'max err':>8s}")
    for batch, cache, filled in ((1, 384, 257), (1, 384, 256), (16, 384, 257), (1, 4096, 2730), (16, 4096, 2730)):
        q = torch.randn(batch, 1, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        kv = [[torch.randn(batch, 8, cache, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
              for _ in range(layers)]
        mask = torch.zeros(batch, cache, dtype=torch.bool, device="cuda")
        mask[:, :filled] = True
        scale = 128 ** -0.5
        ref = DA.decode_attention_reference(q, kv[0][0], kv[0][1], mask, scale).float()
        for block in blocks:
            DAT.BLOCK_S = block
            try:
                for n in [None] + splits:
                    run = lambda n=n: [DAT.decode_attention_triton(q, k, v, mask, scale, splits=n) for k, v in kv]
                    err = (run()[0].float() - ref).abs().max().item()
                    us = graph_us(run, reps=1, iters=200) / layers
                    chosen = n if n is not None else DAT.split_plan(batch, 8, cache, DAT._sm_count(0))[1]
                    rows.append({"batch": batch, "cache": cache, "filled": filled, "block": block,
                                 "splits": chosen, "default": n is None, "us": us, "max_abs_diff": err})
                    print(f"{batch:5d} {cache:6d} {filled:6d} {block:5d} {chosen:6d}{'*' if n is None else ' '} "
                          f"{us:8.2f} {err:8.1e}", flush=True)
            finally:
                DAT.BLOCK_S = default_block
    write_json(args.out, {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": layers,
                          "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
