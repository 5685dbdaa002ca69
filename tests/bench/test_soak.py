"""The soak's own checks: the token verdict and the memory-trend arithmetic, on hand-made inputs; the
process-tree sampler on this test's own child process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.procs import RssSampler, growth_mib, is_flat, slope_per_min, tree
from bench.soak import Outcome, Soak


def _soak(expected: list[list[int]]) -> Soak:
    soak = Soak("http://unused", [([1, 2], len(e)) for e in expected], timeout_s=1)
    soak.expected = expected
    return soak


def test_verdict_tells_lost_duplicated_and_mismatched_tokens_apart():
    soak = _soak([[5, 6, 7], [8, 9]])
    outs = [
        Outcome(0, ok=True, tokens=[5, 6, 7]),
        Outcome(1, ok=True, tokens=[8]),  # claimed success with a token missing
        Outcome(1, ok=True, tokens=[8, 9, 9]),  # one repeated
        Outcome(0, ok=True, tokens=[5, 7, 6]),  # all there, wrong order
        Outcome(0, error="HTTP 429: busy", tokens=[]),  # a clear failure is not a loss
    ]
    v = soak.verdict(outs)
    assert (v["ok"], v["failed"], v["lost_tokens"], v["duplicated_tokens"], v["mismatched"]) == (1, 1, 1, 1, 1)
    assert v["errors"] == {"HTTP 429: busy": 1}


def test_slope_and_flatness():
    times = [0.0, 60.0, 120.0, 180.0]
    assert abs(slope_per_min(times, [100.0, 102.0, 104.0, 106.0]) - 2.0) < 1e-9
    assert slope_per_min([0.0], [1.0]) == 0.0
    leak = [400.0 + 5.0 * i for i in range(10)]  # 5 MiB per sample, to the end
    step = [380.0] * 5 + [392.0] * 5  # one new high-water mark, then flat
    assert growth_mib(leak) == 40.0 and not is_flat(400.0, growth_mib(leak))
    assert growth_mib(step) == 12.0 and is_flat(380.0, growth_mib(step))
    assert is_flat(2000.0, 50.0)  # within 3% of a large process


def test_sampler_follows_a_process_tree():
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(30)"])
    try:
        assert child.pid in tree(os.getpid())
        sampler = RssSampler(child.pid, 0.05)
        sampler.start()
        time.sleep(1.0)
        sampler.stop()
        (row,) = sampler.summary()
        assert row["pid"] == child.pid and row["samples"] >= 5
        assert row["max_mib"] >= 60  # the 64 MiB it holds
    finally:
        child.kill()
        child.wait()
