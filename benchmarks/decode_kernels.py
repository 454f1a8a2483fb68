"""Decode kernels (M = 1 and 16): sweep the options, pick the fastest per shape, compare with cuBLAS bf16
and torch's own int4 kernel.

One GPU call::

    PYTHONPATH=. python benchmarks/decode_kernels.py [--stages 2] [--out benchmarks/results/decode_kernels.json]
                                                     [--tuned graphquant/kernels/gemv_tuned.json]
    # a partial sweep (replaces a tuned entry only where it measured something faster):
    PYTHONPATH=. python benchmarks/decode_kernels.py --kinds W4A16 --impls w4_mma,gemv_packed --quick
    # only the kernel the table picks per shape, weights from HBM, beside FBGEMM GenAI's (table not rewritten):
    PYTHONPATH=.:/tmp/site python benchmarks/decode_kernels.py --table-only --cold --fbgemm

For each Llama-3-8B Linear shape (q/o 4096x4096, k/v 1024x4096, fused q|k|v 6144x4096, gate/up
14336x4096, fused gate|up 28672x4096, down 4096x14336), each weight kind (W8A16 int8 per-channel, W4A16
int4 g128, W8A8 int8 codes, W8A8 fp8 codes) and M in (1, 16) it times every option of the decode kernels
in ``graphquant.kernels.quant_triton`` (``gemv`` and ``gemv_packed`` on CUDA cores at M = 1; ``wq_mm``, the
W8A8 tensor-core kernel, which dequantizes weight-only codes in registers; ``w4_mma``, W4A16 on tensor cores
with the weight as the left operand; ``w4_f16mma``, W4A16 on the 16-bit tensor cores with the weight as the right
operand, nibbles turned into floats in PTX; ``w4_i8mma``, W4A16 at one to four rows on the int8 tensor cores,
the activation in exact int8 pieces; ``wq_mm``'s ``SWAP`` tiles, W8A8 with the weight as the left operand;
``w8_mma``, W8A16 on the fp16 tensor cores, exact), each checked against an fp32 reference, in a CUDA graph of 20 calls (median of 20 replays). The fastest per (kind, shape, M) goes
into ``gemv_tuned.json`` (keyed by GPU name), which ``decode_choice`` reads. References on the same
shapes: bf16 ``F.linear`` (cuBLAS) and, for W4A16, torch's tinygemm (``aten._weight_int4pack_mm``, bf16
scales); with ``--gemlite`` / ``--fbgemm`` those libraries' kernels (their wheels carried to the GPU machine;
not graphquant dependencies): timed and recorded, never written to the table. Bandwidth = weight bytes
(codes + scales) / time, against the 4.3 TB/s the H200 copies at.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from graphquant.kernels import quant_triton as QT  # noqa: E402

from graphquant.timing import graph_us  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from generate_gpu import write_json  # noqa: E402

PEAK = 4.3e12
SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "qkv": (6144, 4096), "gate/up": (14336, 4096),
          "gate|up": (28672, 4096), "down": (4096, 14336)}
KINDS = ("W8A16", "W4A16", "W8A8-int8", "W8A8-fp8")
GROUP = 128


def gemv_options(kind: str, stages_list):
    bks = (1024, 2048) if kind == "W4A16" else (512, 1024)
    for bn, bk, split in itertools.product((4, 8, 16), bks, (1, 2)):
        if bn * bk > 16384:
            continue
        for stages in stages_list:
            yield dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=stages)


def packed_options(kind: str, quick: bool = False):
    """``gemv_packed`` tiles; ``quick``: the neighbourhood of the earlier sweeps' winners (BLOCK_N 16-32,
    BLOCK_Q 128, 4 warps), each with and without the register prefetch."""
    if quick:
        for bn, bq, split, prefetch in itertools.product((16, 32), (128,), (1, 2, 4), (False, True)):
            yield dict(BLOCK_N=bn, BLOCK_Q=bq, SPLIT_K=split, num_warps=4, PREFETCH=prefetch)
        return
    for bn, bq, split, warps, prefetch in itertools.product((16, 32, 64), (32, 64, 128), (1, 2, 4), (4, 8),
                                                            (False, True)):
        if bn * bq <= 4096 and (warps == 4 or bn * bq >= 2048):
            yield dict(BLOCK_N=bn, BLOCK_Q=bq, SPLIT_K=split, num_warps=warps, PREFETCH=prefetch)


def w4_mma_options(quick: bool = False):
    """``w4_mma`` tiles: weight rows per program, split-K, prefetch, pipeline stages. ``quick``: no prefetch and
    splits 2-8 (the first H200 sweep, ``results/decode_kernels_w4_mma.json``: the prefetch won no shape, and
    split 4, the largest tried, won every shape at M = 1)."""
    splits, prefetches = ((2, 4, 8), (False,)) if quick else ((1, 2, 4, 8, 16), (False, True))
    for bn, split, prefetch, stages in itertools.product((32, 64, 128), splits, prefetches, (1, 3)):
        yield dict(BLOCK_N=bn, SPLIT_K=split, PREFETCH=prefetch, num_warps=4, num_stages=stages)


def w4_f16mma_options(quick: bool = False):
    """``w4_f16mma`` tiles: weight columns per program, split-K over the groups, pipeline stages (the loop step is
    one group). ``quick``: 64-256 columns, 3-4 stages (``kernel_sass.py``: 3.50 / 2.70 / 2.35 instructions per
    weight element at 64 / 128 / 256 columns)."""
    bns, stages = ((64, 128, 256), (3, 4)) if quick else ((32, 64, 128, 256), (2, 3, 4))
    for bn, split, st in itertools.product(bns, (1, 2, 4, 8), stages):
        yield dict(BLOCK_N=bn, SPLIT_K=split, num_warps=4, num_stages=st)


def w4_i8mma_options(quick: bool = False, gps=(4,)):
    """``w4_i8mma`` tiles (one to four rows; the activation's pieces made by a launch before): weight columns per
    program, split-K over the steps of four groups, pipeline stages, warps (``results/w4_probe_i8mma.json``: 64
    columns and 2-3 stages ahead on gate|up and down). ``quick``: 32-128 columns, 4 warps. ``gps``: groups per loop
    step (fewer: a smaller step tile, fewer registers per thread, more programs per SM)."""
    bns, warps = ((32, 64, 128), (4,)) if quick else ((32, 64, 128, 256), (2, 4, 8))
    for gps, bn, split, st, nw in itertools.product(gps, bns, (1, 2, 4, 8), (2, 3), warps):
        yield dict(BLOCK_N=bn, SPLIT_K=split, GPS=gps, num_warps=nw, num_stages=st)


def w8_mma_options():
    """``w8_mma`` tiles: ``wq_mm``'s grid for 16-bit activations, each with and without ``ONE_SCALE`` (one power of two per activation
    row for the whole K range), and 256 weight columns by 128 (``kernel_sass.py``: 2.89 instructions per weight
    element with ``ONE_SCALE``, against 3.26 at 128 x 256)."""
    for cfg in mma_options("W8A16"):
        for one in (False, True):
            yield dict(cfg, ONE_SCALE=one)
    for split, stages in itertools.product((1, 2, 4), (3, 4)):
        yield dict(BLOCK_N=256, BLOCK_K=128, SPLIT_K=split, num_warps=4, num_stages=stages, ONE_SCALE=True)


def mma_options(kind: str, quick: bool = False):
    """``wq_mm`` tiles; for W8A8 also with ``SWAP`` (the weight tile as the left operand: a warpgroup MMA on the
    codes, 64 or 128 weight rows per program). ``quick`` (W8A8): every ``SWAP`` tile, and the unswapped tiles at
    256-long K steps with 1 or 4 splits and 3 stages (where the earlier sweeps' winners lie)."""
    bks = (128,) if kind == "W4A16" else (128, 256)
    grid = itertools.product((32, 64, 128), (256,), (1, 4), (3,)) if quick and kind.startswith("W8A8") else \
        itertools.product((32, 64, 128), bks, (1, 2, 4), (3, 4))
    for bn, bk, split, stages in grid:
        yield dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=stages)
    if kind.startswith("W8A8"):
        for bn, bk, split, stages in itertools.product((64, 128), (128, 256), (1, 2, 4, 8), (3, 4)):
            yield dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=stages, SWAP=True)


_GEMLITE: dict = {}


def gemlite_reference(op, ref) -> dict:
    """gemlite (a Triton kernel library, not a graphquant dependency: ``--gemlite``, its wheel carried to the
    GPU machine) on the same weight: ``gemlite_us`` and its error against the fp32 reference, or
    ``gemlite_error``. Its H100 tuning table is loaded (it names no H200 table), so no shape autotunes in the
    timed calls; int4 as its grouped INT format (``W = (W_q - zeros) * scales``, zeros 8, bf16 scales), int8
    as its channel-wise A16W8."""
    try:
        import os

        import gemlite
        from gemlite.helper import A16W8_INT8, A16Wn

        if not _GEMLITE:
            cfg = os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json")
            _GEMLITE["version"] = gemlite.__version__
            _GEMLITE["config"] = gemlite.load_config(cfg) and "h100.json"
        a, w, s = op["a"], op["w"], op["w_scale"]
        if op["w_kind"] == QT.W_INT4:
            u = torch.stack([w & 0xF, w >> 4], -1).reshape(w.shape[0], -1).contiguous()
            sb = s.to(torch.bfloat16)
            layer = A16Wn(device=a.device, dtype=torch.bfloat16).from_weights(
                u, sb, torch.full_like(sb, 8.0), W_nbits=4, group_size=GROUP)
        else:
            layer = A16W8_INT8(device=a.device, dtype=torch.bfloat16).from_weights(
                w, scales=s.reshape(-1, 1).to(torch.bfloat16))
        out = layer(a)
        err = float((out.float() - ref).abs().max() / ref.abs().max())
        return {"gemlite_us": graph_us(lambda: layer(a)), "gemlite_err": err, "gemlite_version": _GEMLITE["version"],
                "gemlite_config": _GEMLITE["config"]}
    except Exception as e:  # noqa: BLE001 - a missing or failing library is recorded, the sweep goes on
        return {"gemlite_error": f"{type(e).__name__}: {str(e)[:160]}"}


def fbgemm_reference(op, ref, copies: int = 1) -> dict:
    """FBGEMM GenAI's kernels (``fbgemm-gpu-genai``, not a graphquant dependency: ``--fbgemm``, its wheel carried to
    the GPU machine) on a weight of the same shape and bytes, each timed as the graphquant kernels are (with
    ``--cold`` the timed calls cycle through ``copies`` weights): W4A16 its preshuffled CUTLASS mixed-input kernel
    ``bf16i4bf16_shuffled`` (int4 under bf16 group scales and zeros, group 128) on the same codes: graphquant's
    unsigned nibbles ``u`` (weight ``(u - 8) * s``) are FBGEMM's signed ones ``u - 8`` (two's complement: the packed
    bytes ``^ 0x88``) under the same scales in bf16 and zero offsets, laid out by its ``preshuffle_i4``; W8A16 its
    GEMV on fp8 weights with bf16 activations
    ``bf16fp8bf16_fast_gemv`` (one per-tensor scale: the same bytes in another format); W8A8-fp8 its CUTLASS rowwise
    kernel ``f8f8bf16_rowwise`` (fast accumulation) and its GEMV ``fp8fp8bf16_fast_gemv`` on the same codes and
    scales. Returns ``fbgemm_<name>_us`` and ``fbgemm_<name>_err`` (largest error against the fp32 reference over its
    largest element; it includes the bf16 rounding of the int4 scales and, for the fp8 weights, that format's), or
    ``fbgemm_<name>_error`` / ``fbgemm_error``. int8 W8A8 has no FBGEMM counterpart here."""
    try:
        import fbgemm_gpu.experimental.gen_ai  # noqa: F401  (registers torch.ops.fbgemm)
    except Exception as e:  # noqa: BLE001 - a missing library is recorded, the sweep goes on
        return {"fbgemm_error": f"{type(e).__name__}: {str(e)[:160]}"}
    a, K = op["a"], op["a"].shape[1]
    fb = torch.ops.fbgemm
    makers = {}
    if op.get("a_scale") is None and op["w_kind"] == QT.W_INT4:
        def shuffled():
            signed = (op["w"].view(torch.uint8) ^ 0x88).view(torch.int8)
            scales = op["w_scale"].t().contiguous().to(torch.bfloat16)
            wq, gs = fb.preshuffle_i4(signed, scales)
            gz = torch.zeros_like(scales)
            return lambda: fb.bf16i4bf16_shuffled(a, wq, gs, gz)

        makers["bf16i4bf16_shuffled"] = shuffled
    elif op.get("a_scale") is None and op["w_kind"] == QT.W_INT8:
        wf = QT.dequantize_weight(op["w"], op["w_scale"], w_kind=QT.W_INT8, K=K)

        def fp8_weight_gemv():
            wq, ws = fb.quantize_fp8_per_tensor(wf)
            return lambda: fb.bf16fp8bf16_fast_gemv(a, wq, ws)

        makers["bf16fp8bf16_fast_gemv"] = fp8_weight_gemv
    elif op["w_kind"] == QT.W_FP8 and op.get("a_scale") is not None:
        sa = op["a_scale"].float().reshape(-1).contiguous()

        def own_weight():  # each maker's call owns a copy (``--cold`` cycles through them)
            return op["w"].clone(), op["w_scale"].float().clone()

        def rowwise():
            w, sw = own_weight()
            return lambda: fb.f8f8bf16_rowwise(a, w, sa, sw, use_fast_accum=True)

        def fp8_gemv():
            w, sw = own_weight()
            return lambda: fb.fp8fp8bf16_fast_gemv(a, w, sa, sw, is_batched=False)

        makers.update(f8f8bf16_rowwise=rowwise, fp8fp8bf16_fast_gemv=fp8_gemv)
    out = {}
    for name, make in makers.items():
        try:
            fns = [make() for _ in range(max(1, copies))]
            y = fns[0]()
            out[f"fbgemm_{name}_err"] = float((y.float() - ref).abs().max() / ref.abs().max())
            it = itertools.cycle(fns)
            out[f"fbgemm_{name}_us"] = graph_us(lambda: next(it)())
        except Exception as e:  # noqa: BLE001 - a kernel that refuses the shape is recorded
            out[f"fbgemm_{name}_error"] = f"{type(e).__name__}: {str(e)[:160]}"
    return out


def bf16_us(N, K, dev):
    """cuBLAS bf16 ``F.linear`` at M = 1 and M = 16 (the baseline)."""
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
    x1 = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    x16 = torch.randn(16, K, device=dev, dtype=torch.bfloat16)
    return graph_us(lambda: F.linear(x1, w)), graph_us(lambda: F.linear(x16, w))


def operands(kind, N, K, M, dev):
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    if kind == "W4A16":
        w = torch.randint(0, 256, (N, K // 2), device=dev, dtype=torch.uint8)
        s = torch.rand(N, K // GROUP, device=dev) * 0.01
        return dict(a=x, w=w, w_scale=s, w_kind=QT.W_INT4, group=GROUP), w.numel() + s.numel() * 4
    w = torch.randint(-127, 128, (N, K), device=dev, dtype=torch.int8)
    s = torch.rand(N, device=dev) * 0.01
    nbytes = w.numel() + s.numel() * 4
    if kind == "W8A16":
        return dict(a=x, w=w, w_scale=s, w_kind=QT.W_INT8), nbytes
    fp8 = kind == "W8A8-fp8"
    q, sa = QT.quantize_rows(x, fp8)
    if fp8:
        w = (torch.randn(N, K, device=dev) * 40).to(torch.float8_e4m3fn)
    return dict(a=q, w=w, w_scale=s, w_kind=QT.W_FP8 if fp8 else QT.W_INT8, a_scale=sa), nbytes


def cold_copies(op: dict, nbytes: int, dev) -> list:
    """``op`` and copies of its weight (and scales) enough to span twice the GPU's L2 cache, for ``--cold``: the
    timed calls cycle through them, so each reads its weight from HBM as in a model's decode step (20 calls on one
    weight keep a weight of up to about the L2's size on chip: the Llama-3-8B q/o, qkv and k/v weights all are)."""
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    n = max(1, -(-2 * l2 // nbytes))
    return [op] + [dict(op, w=op["w"].clone(), w_scale=op["w_scale"].clone()) for _ in range(n - 1)]


def timed_us(fn, ops: list, cfg: dict) -> float:
    """CUDA-graph time of one call of ``fn`` with ``cfg``, the calls cycling through ``ops`` (:func:`cold_copies`)."""
    it = itertools.cycle(ops)
    return graph_us(lambda: fn(**next(it), out_dtype=torch.bfloat16, config=dict(cfg)))


def reference(op):
    """fp32 reference of one gemv call (to check every tile option computes the same thing)."""
    a, w, s = op["a"], op["w"], op["w_scale"]
    if op["w_kind"] == QT.W_INT4:
        u = torch.stack([w & 0xF, w >> 4], -1).reshape(w.shape[0], -1).float()
        W = (u - 8) * s.repeat_interleave(GROUP, 1)
    else:
        W = w.float() * s[:, None]
    out = a.float() @ W.t()
    if op.get("a_scale") is not None:
        out = out * op["a_scale"].float().reshape(-1, 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", default="2", help="comma-separated num_stages values to try")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_kernels.json"))
    ap.add_argument("--tuned", default=str(ROOT / "graphquant" / "kernels" / "gemv_tuned.json"))
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--shapes", default="", help="comma-separated shape names (default: all of SHAPES)")
    ap.add_argument("--kinds", default="", help="comma-separated kinds (default: all of KINDS)")
    ap.add_argument("--impls", default="",
                    help="comma-separated kernels: gemv, gemv_packed, w4_mma, w4_f16mma, w4_i8mma, w8_mma, wq_mm "
                         "(default: all)")
    ap.add_argument("--m", default="1,16", help="comma-separated M values")
    ap.add_argument("--table-only", action="store_true",
                    help="time only the kernel and tile the tuned table (or decode_choice's heuristics) picks for each "
                         "shape, a same-machine baseline for --fbgemm / --gemlite; the table is not rewritten")
    ap.add_argument("--fbgemm", action="store_true",
                    help="also time FBGEMM GenAI's kernels (fbgemm-gpu-genai on PYTHONPATH) on the W4A16, W8A16 and "
                         "fp8 W8A8 shapes")
    ap.add_argument("--gemlite", action="store_true",
                    help="also time gemlite's kernels on the W4A16 / W8A16 weights (its wheel on PYTHONPATH)")
    ap.add_argument("--gps", default="4", help="w4_i8mma: comma-separated groups per loop step to try (1, 2, 4)")
    ap.add_argument("--cold", action="store_true",
                    help="time each call on a weight that is not in L2 (calls cycle through copies spanning twice "
                         "the L2 cache; cold_copies); without it 20 calls reuse one weight")
    ap.add_argument("--quick", action="store_true",
                    help="smaller option grids for gemv_packed, w4_mma, w4_f16mma and W8A8 wq_mm (each option is one "
                         "Triton compile)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_kernels.py times CUDA kernels and needs a CUDA GPU; run it on the GPU machine "
                         "(benchmarks/kernel_sass.py inspects the kernels' sm_90 code without one)")
    args.shapes, args.kinds, args.impls = ([v for v in a.split(",") if v] for a in (args.shapes, args.kinds, args.impls))
    args.m = [int(v) for v in args.m.split(",")]
    try:
        args.gps = tuple(int(v) for v in args.gps.split(","))
        assert all(v in (1, 2, 4) for v in args.gps)
    except (ValueError, AssertionError):
        raise SystemExit(f"decode_kernels.py: --gps {args.gps!r}: give a comma-separated list of 1, 2 and 4") from None
    if unknown := [v for v in args.shapes if v not in SHAPES]:
        raise SystemExit(f"decode_kernels.py: unknown --shapes {unknown}; choose from {', '.join(SHAPES)}")
    stages = [int(v) for v in args.stages.split(",")]
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    t0 = time.time()
    rows, best, summary = [], {}, []
    for sname in args.shapes or SHAPES:  # in the order given, so a time budget cuts the last ones
        N, K = SHAPES[sname]
        t_bf16, t_bf16_16 = bf16_us(N, K, dev)
        print(f"\n{sname:8s} N={N:6d} K={K:6d}  bf16 cuBLAS {t_bf16:6.1f} us ({2 * N * K / t_bf16 / 1e3:5.0f} GB/s); "
              f"M=16 {t_bf16_16:6.1f} us", flush=True)
        for kind in KINDS:
            if args.kinds and kind not in args.kinds:
                continue
            a_kind = QT.A_FLOAT if kind in ("W8A16", "W4A16") else (QT.A_FP8 if "fp8" in kind else QT.A_INT8)
            op1 = None
            for M in args.m:
                op, nbytes = operands(kind, N, K, M, dev)
                if op1 is not None:  # M = 16 multiplies the same weight
                    op["w"], op["w_scale"] = op1["w"], op1["w_scale"]
                op1 = op
                ref = reference(op)
                ops = cold_copies(op, nbytes, dev) if args.cold else [op]
                cands = []
                impls = (["gemv"] if M == 1 else []) + ["wq_mm"]
                if M == 1 and kind in ("W8A16", "W4A16"):
                    impls.append("gemv_packed")
                if kind == "W8A16":
                    impls.append("w8_mma")
                if kind == "W4A16":
                    impls += ["w4_mma", "w4_f16mma"] + (["w4_i8mma"] if M <= 4 else [])
                impls = [i for i in impls if not args.impls or i in args.impls]
                picked = None
                if args.table_only:
                    picked = QT.decode_choice(M, N, K, a_kind, op["w_kind"], GROUP, dev)
                    impls = [picked[0]] if picked and picked[0] != "tinygemm" else []
                for impl in impls:
                    opts = [picked[1]] if picked else {
                            "gemv": lambda: gemv_options(kind, stages), "wq_mm": lambda: mma_options(kind, args.quick),
                            "gemv_packed": lambda: packed_options(kind, args.quick),
                            "w4_mma": lambda: w4_mma_options(args.quick),
                            "w8_mma": lambda: w8_mma_options(),
                            "w4_f16mma": lambda: w4_f16mma_options(args.quick),
                            "w4_i8mma": lambda: w4_i8mma_options(args.quick, args.gps)}[impl]()
                    for cfg in opts:
                        if time.time() - t0 > args.budget_s:
                            break
                        fn = {"gemv": QT.gemv, "wq_mm": QT.wq_mm, "gemv_packed": QT.gemv_packed,
                              "w4_mma": QT.w4_mma, "w8_mma": QT.w8_mma, "w4_f16mma": QT.w4_f16mma,
                              "w4_i8mma": QT.w4_i8mma}[impl]
                        if impl == "wq_mm":
                            cfg = {**QT._mm_config(M, N, K, op["w_kind"], GROUP, dev), **cfg}
                        try:
                            out = fn(**op, out_dtype=torch.float32, config=dict(cfg))
                            err = float((out - ref).abs().max() / ref.abs().max())
                            t = timed_us(fn, ops, cfg) if err < 1e-3 else float("inf")
                        except Exception as e:  # noqa: BLE001 - an option that does not build is skipped
                            t, err = float("inf"), None
                            print(f"   {kind} M={M} {impl} {cfg}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                        cands.append((t, impl, cfg))
                        rows.append({"shape": sname, "N": N, "K": K, "M": M, "kind": kind, "impl": impl, "us": t,
                                     "err": err, **cfg})
                cands.sort(key=lambda c: c[0])
                t_best, impl_best, cfg_best = cands[0] if cands else (float("inf"), None, None)
                by_impl = {i: min((c[0] for c in cands if c[1] == i), default=None) for i in impls}
                extra = {}
                if kind == "W4A16":
                    try:
                        wi = torch.randint(0, 16, (N, K), device=dev, dtype=torch.int32)
                        packed = torch.ops.aten._convert_weight_to_int4pack(
                            (wi[:, ::2] << 4 | wi[:, 1::2]).to(torch.uint8), 8)
                        sz = torch.rand(K // GROUP, N, 2, device=dev, dtype=torch.bfloat16)
                        xa = op["a"]
                        extra["tinygemm_us"] = graph_us(lambda: torch.ops.aten._weight_int4pack_mm(xa, packed, GROUP, sz))
                        if M <= 4:  # a candidate: QuantLinear runs tinygemm at decode when decode_choice says so
                            cands.append((extra["tinygemm_us"], "tinygemm", {}))
                            cands.sort(key=lambda c: c[0])
                            t_best, impl_best, cfg_best = cands[0]
                    except Exception as e:  # noqa: BLE001
                        extra["tinygemm_error"] = f"{type(e).__name__}: {str(e)[:100]}"
                if args.gemlite and kind in ("W4A16", "W8A16"):
                    extra.update(gemlite_reference(op, ref))
                if args.fbgemm:
                    extra.update(fbgemm_reference(op, ref, len(ops)))
                if cfg_best is not None:
                    keep = {k: v for k, v in cfg_best.items() if k not in ("BLOCK_M",)}
                    best[f"{a_kind},{op['w_kind']},{N},{K},{QT.m_bucket(M)}"] = {"impl": impl_best, **keep,
                                                                       "us": round(t_best, 1)}
                t_ref = t_bf16 if M == 1 else t_bf16_16
                line = {"shape": sname, "N": N, "K": K, "M": M, "kind": kind, "best_us": t_best, "best_impl": impl_best,
                        "best": cfg_best, "best_by_impl_us": by_impl, "bf16_us": t_ref, "weight_bytes": nbytes,
                        "GBps": nbytes / t_best / 1e3 if t_best < float("inf") else None,
                        "frac_peak": nbytes / (t_best * 1e-6) / PEAK if t_best < float("inf") else None,
                        "speedup_vs_bf16": t_ref / t_best, **extra}
                summary.append(line)
                print(f"   {kind:10s} M={M:2d} {impl_best or '-':6s} {t_best:6.1f} us {line['GBps'] or 0:5.0f} GB/s "
                      f"({(line['frac_peak'] or 0):4.0%}) {t_ref / t_best:4.2f}x bf16 | "
                      + " ".join(f"{i} {v:6.1f}" for i, v in by_impl.items() if v is not None)
                      + (f" | tinygemm {extra['tinygemm_us']:6.1f}" if "tinygemm_us" in extra else "")
                      + (f" | gemlite {extra['gemlite_us']:6.1f} (err {extra['gemlite_err']:.1e})"
                         if "gemlite_us" in extra else "")
                      + (f" | gemlite failed: {extra['gemlite_error']}" if "gemlite_error" in extra else "")
                      + "".join(f" | {k[7:-3]} {v:6.1f}" for k, v in extra.items()
                                if k.startswith("fbgemm_") and k.endswith("_us"))
                      + "".join(f" | {k[:-6]} failed: {v}" for k, v in extra.items()
                                if k.startswith("fbgemm") and k.endswith("error"))
                      + f" | {cfg_best}", flush=True)
    out = {"device": name, "torch": torch.__version__, "peak_Bps": PEAK, "weights_cold": args.cold,
           "summary": summary, "rows": rows, "elapsed_s": time.time() - t0}
    write_json(args.out, out)
    if args.table_only:
        print(f"\nwrote {args.out} in {time.time() - t0:.0f} s (the table is not rewritten with --table-only)")
        return
    tuned_path = Path(args.tuned)
    table = json.loads(tuned_path.read_text()) if tuned_path.is_file() else {}
    old = table.get(name, {})
    if args.impls:  # a partial sweep replaces an entry only where it measured something faster
        best = {k: v for k, v in best.items() if v["us"] < old.get(k, {}).get("us", float("inf"))}
    table[name] = {**old, **best}
    write_json(tuned_path, table, sort_keys=True)
    print(f"\nwrote {args.out} and {tuned_path} ({len(best)} tuned shapes) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
