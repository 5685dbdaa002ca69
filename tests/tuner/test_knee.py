"""Knee finding on curves shaped like the H100 decode measurements in DESIGN.md."""

from __future__ import annotations

import random

import pytest

from services.tuner.knee import adaptive_shares, find_knee, knees_by_batch, share_grid
from services.tuner.table import ProfilePoint

# Decode step time (ms) by share, MPS on an H100 (DESIGN.md "Knee profiling"); batch 256 at 1.0,
# 0.25 and 0.1 filled in to the same shape.
STEP_MS = {
    1: ((0.1, 10.2), (0.3, 6.5), (0.5, 5.7), (1.0, 5.5)),
    256: ((0.1, 50.0), (0.25, 20.0), (0.5, 10.5), (0.75, 7.6), (1.0, 7.4)),
}


def step_ms(batch: int, share: float) -> float:
    """Piecewise-linear step time between the measured shares."""
    known = STEP_MS[batch]
    for (s0, t0), (s1, t1) in zip(known, known[1:]):
        if s0 <= share <= s1 + 1e-9:
            return t0 + (share - s0) / (s1 - s0) * (t1 - t0)
    raise ValueError(share)


def throughput(batch: int, share: float) -> float:
    return batch * 1000.0 / step_ms(batch, share)


def test_find_knee_is_the_smallest_share_within_epsilon_of_the_best() -> None:
    curve = [(0.25, 50.0), (0.5, 96.0), (0.75, 99.0), (1.0, 100.0)]
    assert find_knee(curve, 0.05) == 0.5
    assert find_knee(curve, 0.005) == 1.0
    assert find_knee(curve, 0.6) == 0.25
    # Noise: the best observed (at 0.75) is the reference, not the value at 1.0.
    assert find_knee([(0.5, 90.0), (0.75, 100.0), (1.0, 94.0)], 0.05) == 0.75
    # Repeats at one share are averaged: 0.5 averages to 93 (< 95), so the knee is 0.75.
    assert find_knee([(0.5, 98.0), (0.5, 88.0), (0.75, 99.0), (1.0, 100.0)], 0.05) == 0.75
    with pytest.raises(ValueError):
        find_knee([], 0.05)


def test_knee_moves_with_batch_size_on_the_h100_shapes() -> None:
    grid = share_grid(0.1, 1.0, 0.05)
    points = [
        ProfilePoint("llama-8b", "decode", "H100", share,
                     {"max_batch_size": batch, "max_concurrency": batch, "prefill_chunk_size": chunk},
                     throughput(batch, share) * (1.0 if chunk == 0 else 0.5), step_ms(batch, share), step_ms(batch, share))
        for batch in STEP_MS for share in grid for chunk in (0, 512)
    ]
    knees = knees_by_batch(points, 0.05)
    assert knees == {1: 0.5, 256: 0.75}
    assert knees_by_batch(points, 0.3)[1] < knees_by_batch(points, 0.3)[256]
    with pytest.raises(ValueError, match="one"):
        knees_by_batch(points + [ProfilePoint("other", "decode", "H100", 0.5, {"max_batch_size": 1}, 1.0, 1.0, 1.0)])


@pytest.mark.parametrize("batch", [1, 256])
def test_adaptive_search_matches_the_grid_with_fewer_measurements(batch: int) -> None:
    grid = share_grid(0.1, 1.0, 0.05)
    exhaustive = find_knee([(s, throughput(batch, s)) for s in grid], 0.05)
    knee, measured = adaptive_shares(lambda s: throughput(batch, s), 0.1, 1.0, 0.05, 0.05)
    assert knee == exhaustive
    assert len(measured) <= 7 < len(grid)
    assert set(measured) <= set(grid)


def test_adaptive_search_with_noise_still_meets_the_final_best() -> None:
    rng = random.Random(7)
    for _ in range(50):
        noise = {s: rng.uniform(0.97, 1.03) for s in share_grid(0.1, 1.0, 0.05)}
        knee, measured = adaptive_shares(lambda s: throughput(256, s) * noise[s])
        best = max(measured.values())
        assert measured[knee] >= 0.95 * best
        assert all(v < 0.95 * best for s, v in measured.items() if s < knee)
        assert 0.6 <= knee <= 1.0


def test_adaptive_search_takes_a_spike_mid_search_as_the_new_best() -> None:
    # Flat from 0.5 except a spike at 0.55 (the first bisection point): 1.0 no longer qualifies.
    curve = {s: (50.0 if s < 0.5 else 100.0) for s in share_grid(0.1, 1.0, 0.05)}
    curve[0.55] = 120.0
    knee, measured = adaptive_shares(lambda s: curve[s], 0.1, 1.0, 0.05, 0.05)
    assert knee == 0.55
    assert measured[0.5] == 100.0  # measured, and below 0.95 * 120


def test_flat_curve_knee_is_lo_after_two_measurements() -> None:
    knee, measured = adaptive_shares(lambda s: 100.0, 0.2, 1.0, 0.05, 0.1)
    assert (knee, len(measured)) == (0.2, 2)
    assert share_grid(0.2, 1.0, 0.3) == [0.2, 0.5, 0.8, 1.0]
