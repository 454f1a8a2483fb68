"""Timing helpers (the GPU benchmarks, ``StaticDecoder``): CUDA-event medians and CUDA-graph replay.

``median_ms(fn, iters, device)``: median milliseconds of ``fn()`` (CUDA events on CUDA, wall clock on CPU)
after ``warmup`` calls. ``graphed(fn, reps)``: ``reps`` calls of ``fn`` captured in one CUDA graph (warmed
up on a side stream); returns ``(replay, graph)``: keep ``graph`` alive while timing. ``graph_us(fn)``:
microseconds per call of ``fn`` from such a graph (no launch overhead).
"""
from __future__ import annotations

import statistics
import time

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, iters: int, device: str = "cuda", warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, iters)):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def graphed(fn, reps: int = 1, warmup: int = 3):
    """``reps`` calls of ``fn`` captured in one CUDA graph after ``warmup`` calls on a side stream, on that same
    stream: per-stream state the warm-up created (the split-K kernels' tile counters,
    ``quant_triton.tile_counters``) is then found by the capture; on another stream it would be allocated inside
    the capture, and its zero-fill kernel would run in every replay. Returns ``(replay, graph)``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for _ in range(reps):
            fn()
    return g.replay, g


def graph_us(fn, reps: int = 20, iters: int = 20) -> float:
    fn()
    replay, g = graphed(fn, reps, warmup=2)
    t = median_ms(replay, iters, "cuda", warmup=3) * 1e3 / reps
    del g
    return t
