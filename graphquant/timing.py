"""Timing helpers (the GPU benchmarks, ``StaticDecoder``): CUDA-event medians and CUDA-graph replay.

``median_ms(fn, iters, device)``: median milliseconds of ``fn()`` (CUDA events on CUDA, wall clock on CPU)
after ``warmup`` calls. ``back_to_back_ms(fn, iters, replays)``: the same per call of ``fn``, each timed sample
being ``replays`` calls queued back to back (the GPU runs them without the CPU's launch latency between them, as
a generation loop that never waits for the GPU does). ``graphed(fn, reps)``: ``reps`` calls of ``fn`` captured in
one CUDA graph (warmed up on a side stream); returns ``(replay, graph)``: keep ``graph`` alive while timing.
``graph_us(fn)``: microseconds per call of ``fn`` from such a graph (no launch overhead).
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


def back_to_back_ms(fn, iters: int, replays: int, device: str = "cuda", warmup: int = 2) -> float:
    """Median milliseconds per call of ``fn`` over samples of ``replays`` calls each (``ceil(iters / replays)``
    samples, at least 5; ``replays`` 1 is :func:`median_ms`). On CUDA one sample's events bracket all ``replays``
    calls, so the launch latency of a call (the GPU idle until the CPU has submitted it) is paid once per sample,
    not once per call: what a loop that launches ahead of the GPU sees."""
    if replays < 1:
        raise ValueError(f"replays must be >= 1, got {replays}")
    if replays == 1:
        return median_ms(fn, iters, device, warmup)

    def many():
        for _ in range(replays):
            fn()
    return median_ms(many, max(5, -(-iters // replays)), device, warmup=max(1, -(-warmup // replays))) / replays


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
