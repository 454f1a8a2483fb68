"""graphquant.timing on the CPU (wall clock): back-to-back samples are timed per call, every call counted."""
from __future__ import annotations

import time

import pytest

from graphquant.timing import back_to_back_ms, median_ms


def test_back_to_back_samples_are_per_call_and_run_every_replay():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    ms = back_to_back_ms(fn, iters=20, replays=5, device="cpu")
    # one warm-up sample of 5 calls, then ceil(20 / 5) = 4 -> at least 5 samples of 5 calls
    assert len(calls) == 5 + 5 * 5
    assert 1.9 <= ms < 4.0  # per call, not per sample of five (>= 10 ms)


def test_one_replay_is_the_plain_median_and_zero_is_refused():
    calls = []
    assert back_to_back_ms(lambda: calls.append(1), iters=3, replays=1, device="cpu") >= 0
    assert len(calls) == 2 + 3  # median_ms: two warm-up calls, then three timed
    assert median_ms(lambda: None, 3, "cpu") >= 0
    with pytest.raises(ValueError, match="replays must be >= 1"):
        back_to_back_ms(lambda: None, iters=3, replays=0, device="cpu")
