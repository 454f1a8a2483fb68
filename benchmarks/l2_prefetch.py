"""How much a decode product gains when part of its weight was prefetched into L2 during the kernels before it.

Each measurement is a CUDA graph of ``[flush L2] [l2_prefetch(weight, P bytes)] [idle window] [product]``,
timed with and without the product; the difference is the product's time given that prefetch. The idle window
(``torch.cuda._sleep``) stands for the small kernels of a decode step (norms, RoPE, cache writes, attention)
during which HBM is nearly idle. The product is the one the decode table picks (``quant_triton.decode_mm``) at
one row, Llama-3-8B shapes; bf16 ``F.linear`` for reference. ``step_without_us`` (the graph without the product)
shows what the prefetch launch itself holds the stream for.

Finding (H200, ``results/l2_prefetch_tried.json``): the products gain 1.5-2.5 us with 16-48 MB prefetched, but the
prefetch launch holds the stream about as long as its traffic, whatever the idle window after it, so it is not
part of graphquant's decode path (README).

``--parallel``: the prefetch runs on a second stream forked from the graph's stream before the window and joined
after the product (a parallel branch of the CUDA graph), so it cannot hold the window or the product back; then what
counts is the whole step, ``step_with_us`` (flush, window and product), against the same step without a prefetch
(``prefetch`` "none"). ``--window-op KIND:SHAPE`` runs that product in the window before the sleep (W4A16:q/o: the
``o_proj`` of a decode layer, between attention and the MLP). Finding (H200, 2026-12-01,
``results/l2_prefetch_parallel_tried.json``, ``_parallel_window_qo_tried.json``): at most 1.8 us off the whole step
with a 15 us idle window, nothing with ``o_proj`` in the window; not adopted (README).

    PYTHONPATH=. python benchmarks/l2_prefetch.py --out benchmarks/results/l2_prefetch.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    sys.exit("l2_prefetch.py needs a CUDA GPU and Triton")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from graphquant.timing import graph_us  # noqa: E402

MB = 1 << 20
CHUNK = 1 << 16   # bytes per prefetch instruction
PER_PROGRAM = 32  # instructions per program (one warp)


@triton.jit
def l2_prefetch_kernel(ptr, nbytes, CHUNK: tl.constexpr, PER: tl.constexpr, LINES: tl.constexpr = False):
    """L2 prefetches of ``[ptr, ptr + nbytes)``: bulk ones of ``CHUNK`` bytes, ``PER`` per program (each
    piece's size rounded down to 16 bytes, as the instruction needs), or with ``LINES`` one ``prefetch.global.L2``
    per 128-byte line, ``PER`` lines per program."""
    base = ptr.to(tl.pointer_type(tl.uint8))
    if LINES:
        offs = (tl.program_id(0) * PER + tl.arange(0, PER)).to(tl.int64) * 128
        ok = (offs < nbytes).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }",
            "=r,l,r", [base + offs, ok], dtype=tl.int32, is_pure=False, pack=1)
    else:
        offs = (tl.program_id(0) * PER + tl.arange(0, PER)).to(tl.int64) * CHUNK
        size = tl.minimum(nbytes - offs, CHUNK)
        size = (tl.where(size > 0, size, 0) // 16 * 16).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [base + offs, size], dtype=tl.int32, is_pure=False, pack=1)


def supported(t: torch.Tensor) -> bool:
    """CUDA tensors on sm_90 or newer (the bulk prefetch instruction), 16-byte aligned."""
    return (t.is_cuda and torch.cuda.get_device_capability(t.device) >= (9, 0)
            and t.data_ptr() % 16 == 0)


def l2_prefetch(t: torch.Tensor, nbytes: int, chunk: int = CHUNK, per: int = PER_PROGRAM, lines: bool = False,
                num_warps: int = 1) -> None:
    """Start prefetching the first ``nbytes`` of ``t``'s storage (from ``t.data_ptr()``, at most its size) into
    L2; one launch, which returns before the data arrive. No-op where :func:`supported` is False."""
    nbytes = min(int(nbytes), t.untyped_storage().nbytes() - t.storage_offset() * t.element_size())
    if nbytes < 16 or not supported(t):
        return
    grid = (triton.cdiv(nbytes, (128 if lines else chunk) * per),)
    l2_prefetch_kernel[grid](t, nbytes, CHUNK=chunk, PER=per, LINES=lines, num_warps=num_warps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "l2_prefetch.json"))
    ap.add_argument("--kinds", default="W4A16,W8A8-fp8,W8A8-int8,W8A16,bf16")
    ap.add_argument("--shapes", default="gate|up,down,qkv,q/o")
    ap.add_argument("--sizes-mb", default="0,8,16,24,32,40,48")
    ap.add_argument("--window-us", default="15")
    ap.add_argument("--parallel", action="store_true",
                    help="the prefetch on a parallel branch of the graph (a second stream), not before the window")
    ap.add_argument("--window-op", default="",
                    help="KIND:SHAPE: a product run in the window before the sleep (e.g. W4A16:q/o, as o_proj "
                         "runs between attention and the MLP), so the prefetch competes with its weight reads")
    ap.add_argument("--variants", default="bulk64k:32,bulk64k:1,bulk16k:1,lines:256",
                    help="prefetch kernels: bulkNk:PER (NkB per instruction, PER per program) or lines:PER")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("l2_prefetch.py needs a CUDA GPU")
    import decode_kernels as DK
    from graphquant.kernels import quant_triton as QT

    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    flush_buf = torch.ones(3 * l2 // 4, dtype=torch.int32, device=dev)  # read (not written) to flush L2
    # cycles per microsecond of torch.cuda._sleep, from a graph of one long sleep
    per_us = 200_000 / graph_us(lambda: torch.cuda._sleep(200_000), reps=2, iters=5)
    side = torch.cuda.Stream() if args.parallel else None
    w_op = None
    if args.window_op:
        w_kind, w_shape = args.window_op.split(":")
        w_op, _ = DK.operands(w_kind, *DK.SHAPES[w_shape], 1, dev)

    def window_op():
        if w_op is not None:
            QT.decode_mm(**w_op, out_dtype=torch.bfloat16)
    rows = []
    for window in [float(w) for w in args.window_us.split(",")]:
        cycles = int(window * per_us)
        for kind in args.kinds.split(","):
            for shape in args.shapes.split(","):
                N, K = DK.SHAPES[shape]
                if kind == "bf16":
                    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
                    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
                    nbytes = w.numel() * 2

                    def product(w=w, x=x):
                        return F.linear(x, w)
                    choice = "cuBLAS"
                else:
                    op, nbytes = DK.operands(kind, N, K, 1, dev)
                    choice = QT.decode_choice(1, N, K, QT._a_kind(op["a"]), op["w_kind"], op.get("group", 0), dev)
                    choice = choice[0] if choice else "none"

                    def product(op=op):
                        return QT.decode_mm(**op, out_dtype=torch.bfloat16)
                    w = op["w"]
                for variant, size in [(v, int(float(s) * MB)) for v in args.variants.split(",")
                                      for s in args.sizes_mb.split(",")]:
                    if size > nbytes + 8 * MB or (size == 0 and variant != args.variants.split(",")[0]):
                        continue
                    name, per = variant.split(":")
                    opts = dict(lines=True) if name == "lines" else dict(chunk=int(name[4:-1]) * 1024)
                    opts = dict(opts, per=int(per), num_warps=4 if name == "lines" else 1)

                    def step(with_product, size=size, w=w, product=product, opts=opts):
                        flush_buf.max()
                        main = torch.cuda.current_stream()
                        if size and side is not None:  # fork: the prefetch beside the window and the product
                            side.wait_stream(main)
                            with torch.cuda.stream(side):
                                l2_prefetch(w, size, **opts)
                        elif size:
                            l2_prefetch(w, size, **opts)
                        window_op()
                        torch.cuda._sleep(cycles)
                        if with_product:
                            product()
                        if size and side is not None:  # join, as a graph's capture requires
                            main.wait_stream(side)
                    t_with = graph_us(lambda: step(True), reps=10, iters=15)
                    t_without = graph_us(lambda: step(False), reps=10, iters=15)
                    row = dict(kind=kind, shape=shape, N=N, K=K, kernel=choice, weight_mb=nbytes / MB,
                               prefetch=variant if size else "none", prefetch_mb=size / MB, window_us=window,
                               parallel=bool(args.parallel), window_op=args.window_op,
                               product_us=t_with - t_without,
                               step_with_us=t_with, step_without_us=t_without)
                    rows.append(row)
                    print(f"{kind:10s} {shape:8s} {choice:10s} {nbytes / MB:6.1f} MB  window {window:4.0f} us  "
                          f"{row['prefetch']:12s} {size / MB:5.1f} MB: product {t_with - t_without:6.2f} us "
                          f"(rest {t_without:6.2f}, whole step {t_with:6.2f})", flush=True)
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, l2_bytes=l2, rows=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
