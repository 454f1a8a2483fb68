"""How close the W4A16 decode kernels come to streaming the int4 weights: on the Llama-3-8B gate|up (28672 x 4096)
and down (4096 x 14336) shapes at one activation row, a read-only Triton kernel with ``w4_i8mma``'s tile pattern
(each program reads a (BLOCK_N, HALF_STEP) block of packed bytes and keeps one xor of them: the floor a kernel
that must read these bytes could reach) against ``w4_f16mma`` and ``w4_i8mma`` tiles, every weight read from HBM
(``decode_kernels.cold_copies``), CUDA-graph time. One GPU call::

    PYTHONPATH=. python benchmarks/w4_probe.py [benchmarks/results/w4_probe.json]

H200, 2026-11-30 (``results/w4_probe_i8mma.json``): the read-only kernel 15.4 us on gate|up (4.05 TB/s), 8.8 us
on down; ``w4_i8mma`` 23.5 / 16.6 us, ``w4_f16mma`` 32.0 / 19.0 us.
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from decode_kernels import cold_copies, operands, reference, timed_us  # noqa: E402

from graphquant.kernels import quant_triton as QT  # noqa: E402


@triton.jit
def stream_kernel(B, OUT, N, stride_bn, BLOCK_N: tl.constexpr, HALF_STEP: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rh = pid_k * HALF_STEP + tl.arange(0, HALF_STEP)
    w = tl.load(B + rn[None, :] * stride_bn + rh[:, None], mask=(rn < N)[None, :], other=0).to(tl.int32)
    tl.store(OUT + pid_k * tl.num_programs(0) + pid, tl.reduce(w, None, _xor))


@triton.jit
def _xor(a, b):
    return a ^ b


def stream(a, w, w_scale, out_dtype=None, config=None, **_):
    cfg = dict(config)
    bn, hs, nw = cfg["BLOCK_N"], cfg["HALF_STEP"], cfg["num_warps"]
    N, KH = w.shape
    grid = (triton.cdiv(N, bn), KH // hs)
    out = torch.empty(grid[0] * grid[1], device=w.device, dtype=torch.int32)
    stream_kernel[grid](w, out, N, w.stride(0), BLOCK_N=bn, HALF_STEP=hs, num_warps=nw)
    return out


def main():
    if not torch.cuda.is_available():
        raise SystemExit("w4_probe.py times CUDA kernels and needs a CUDA GPU; run it on the GPU machine")
    dev = torch.device("cuda")
    rows = []
    for sname, (N, K) in (("gate|up", (28672, 4096)), ("down", (4096, 14336))):
        op, nbytes = operands("W4A16", N, K, 1, dev)
        ops = cold_copies(op, nbytes, dev)
        ref = reference(op)
        for bn, hs, nw in ((128, 256, 4), (64, 128, 4)):
            t = timed_us(stream, ops, dict(BLOCK_N=bn, HALF_STEP=hs, num_warps=nw))
            rows.append(dict(shape=sname, kernel="stream", BLOCK_N=bn, HALF_STEP=hs, num_warps=nw, us=t,
                             TBps=nbytes / t / 1e6))
            print(f"{sname} stream BN{bn} half-step {hs} warps {nw}: {t:6.1f} us {nbytes / t / 1e6:5.2f} TB/s",
                  flush=True)
        cands = [("w4_f16mma", QT.w4_f16mma, dict(BLOCK_N=128, SPLIT_K=sp, num_warps=4, num_stages=3))
                 for sp in (2, 4, 8)]
        cands += [("w4_i8mma", QT.w4_i8mma, dict(BLOCK_N=bn, SPLIT_K=sp, GPS=4, num_warps=nw,
                                                  num_stages=st))
                  for bn, sp, st, nw in itertools.product((64, 128), (1, 2, 4, 8), (2, 3, 4), (4,))]
        cands += [("w4_i8mma", QT.w4_i8mma, dict(BLOCK_N=bn, SPLIT_K=sp, GPS=4, num_warps=8, num_stages=3))
                  for bn, sp in itertools.product((128, 256), (2, 4))]
        for name, fn, cfg in cands:
            try:
                out = fn(**op, out_dtype=torch.float32, config=dict(cfg))
                err = float((out - ref).abs().max() / ref.abs().max())
                t = timed_us(fn, ops, cfg) if err < 1e-3 else float("inf")
            except Exception as e:  # noqa: BLE001
                print(f"{sname} {name} {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            rows.append(dict(shape=sname, kernel=name, us=t, err=err, TBps=nbytes / t / 1e6, **cfg))
            print(f"{sname} {name} {cfg}: {t:6.1f} us {nbytes / t / 1e6:5.2f} TB/s err {err:.1e}", flush=True)
    out = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "benchmarks" / "results" / "w4_probe.json")
    Path(out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
