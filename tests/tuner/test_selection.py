"""Config selection against brute force, hysteresis, share changes and the prefill/decode split."""

from __future__ import annotations

import random

import pytest

from services.tuner.selection import Choice, best_split, choose, choose_for_share, recommend_split
from services.tuner.table import ProfilePoint, TuningTable

SHARES = (0.25, 0.5, 0.75, 1.0)
BATCHES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256)
SLO_MS = 10.0


def decode_point(share: float, batch: int, chunk: int = 0, noise: float = 1.0) -> ProfilePoint:
    """A decode step of 5 ms plus a compute part that grows with the batch and shrinks with the share."""
    step = 5.0 + 0.01 * batch / share + 0.3 / share
    thr = batch * 1000.0 / step * (0.99 if chunk else 1.0) * noise
    config = {"max_batch_size": batch, "max_concurrency": batch, "prefill_chunk_size": chunk}
    return ProfilePoint("m", "decode", "H100", share, config, thr, step, step * 1.15)


def prefill_point(share: float, chunk: int) -> ProfilePoint:
    """Prefill slows almost in proportion to the share; smaller chunks cost throughput, not latency."""
    thr = 20000.0 * share * (1.0 if chunk == 2048 else 0.9)
    config = {"max_batch_size": 1, "max_concurrency": 4, "prefill_chunk_size": chunk}
    return ProfilePoint("m", "prefill", "H100", share, config, thr, 80.0 / share, 100.0 / share)


def profile(share: float) -> list[ProfilePoint]:
    return [decode_point(share, b, chunk) for b in BATCHES for chunk in (0, 512)]


def brute_force(points: list[ProfilePoint], load: float, slo: float) -> float:
    ok = [p.throughput_tokens_per_s for p in points if p.meets(slo) and p.throughput_tokens_per_s >= load]
    return max(ok)


@pytest.mark.parametrize("share", SHARES)
def test_choice_is_within_5_percent_of_exhaustive_search(share: float) -> None:
    points = profile(share)
    for load in (0.0, 1000.0 * share, 5000.0 * share, 10000.0 * share):
        best = brute_force(points, load, SLO_MS)
        fresh = choose(points, load, SLO_MS)
        assert fresh.reason == "best"
        assert fresh.expected_throughput == best
        assert fresh.expected_p95_ms <= SLO_MS
        # Whatever config it currently runs, what it keeps or switches to is within 5%.
        for p in points:
            choice = choose(points, load, SLO_MS, current=p.config, hysteresis=0.05)
            assert choice.expected_throughput >= 0.95 * best
            assert choice.expected_p95_ms <= SLO_MS
            assert choice.expected_throughput >= load


def test_ties_go_to_the_smaller_batch() -> None:
    a = ProfilePoint("m", "decode", "H100", 1.0, {"max_batch_size": 64}, 1000.0, 5.0, 6.0)
    b = ProfilePoint("m", "decode", "H100", 1.0, {"max_batch_size": 32}, 1000.0, 4.0, 5.0)
    assert choose([a, b], 100.0, SLO_MS).config == {"max_batch_size": 32}


def test_hysteresis_prevents_flapping_on_noisy_observations() -> None:
    rng = random.Random(3)

    def run(hysteresis: float) -> int:
        current: dict[str, int] | None = None
        switches = 0
        for _ in range(200):
            points = [decode_point(1.0, b, chunk, noise=rng.uniform(0.98, 1.02)) for b in BATCHES for chunk in (0, 512)]
            choice = choose(points, rng.uniform(5000.0, 15000.0), SLO_MS, current, hysteresis)
            switches += current is not None and choice.config != current
            current = choice.config
        return switches

    assert run(0.0) > 20  # chunk 0 and 512 are 1% apart: noise alone flips them
    assert run(0.05) == 0


def test_a_config_that_breaks_the_slo_or_the_load_is_left_at_once() -> None:
    points = profile(1.0)
    slow = choose(points, 0.0, 100.0).config  # the biggest batch, fine under a loose SLO
    assert choose(points, 0.0, 100.0, current=slow, hysteresis=10.0).reason == "kept"
    tight = choose(points, 0.0, 8.0, current=slow, hysteresis=10.0)  # batch 256: p95 9.04 ms
    assert tight.reason == "best" and tight.config != slow
    small = {"max_batch_size": 1, "max_concurrency": 1, "prefill_chunk_size": 0}
    assert choose(points, 5000.0, SLO_MS, current=small, hysteresis=10.0).config != small


def test_overload_and_unmeetable_slo_are_reported() -> None:
    points = profile(0.25)
    over = choose(points, 1e9, SLO_MS)
    assert over.reason == "overloaded"
    assert over.expected_throughput == max(p.throughput_tokens_per_s for p in points if p.meets(SLO_MS))
    none = choose(points, 100.0, 1.0)
    assert none.reason == "no_config_meets_slo"
    assert none.expected_p95_ms == min(p.latency_p95_ms for p in points)
    assert none.config["max_batch_size"] == 1
    with pytest.raises(ValueError):
        choose([], 1.0, SLO_MS)


def test_share_change_switches_at_once_to_the_new_shares_config() -> None:
    table = TuningTable()
    for share in SHARES:
        for p in profile(share):
            table.add(p)
    at_full = choose_for_share(table, "m", "decode", "H100", 1.0, 5000.0, SLO_MS)
    shrunk = choose_for_share(table, "m", "decode", "H100", 0.6, 5000.0, SLO_MS, current=at_full.config, hysteresis=10.0)
    assert shrunk == choose(profile(0.5), 5000.0, SLO_MS)  # 0.6 reads the 0.5 profile
    assert shrunk.config["max_batch_size"] < at_full.config["max_batch_size"]
    grown = choose_for_share(table, "m", "decode", "H100", 1.0, 5000.0, SLO_MS, current=shrunk.config)
    assert grown == at_full  # the small batch is far more than 5% behind at full share
    with pytest.raises(LookupError):
        choose_for_share(table, "m", "decode", "cpu", 1.0, 5000.0, SLO_MS)
    assert isinstance(grown, Choice)


def test_split_meets_both_slos_with_the_most_headroom() -> None:
    prefill = [prefill_point(s, c) for s in SHARES for c in (512, 2048)]
    decode = [p for s in SHARES for p in profile(s)]
    prefill_slo = 300.0  # needs share >= 1/3
    split = best_split(prefill, decode, 6000.0, 10000.0, prefill_slo, SLO_MS)
    assert split is not None
    # Brute force over the grid: the largest worst-stage headroom.
    expected = max(
        (min(20000.0 * ps / 6000.0, brute_force([p for p in decode if p.share == ds], 0.0, SLO_MS) / 10000.0), ps, ds)
        for ps in (0.5, 0.75) for ds in SHARES if ps + ds <= 1.0
    )
    assert (split.prefill_share, split.decode_share) == (expected[1], expected[2])
    assert split.headroom == pytest.approx(expected[0])
    assert split.prefill_share + split.decode_share <= 1.0
    assert recommend_split(prefill, decode, 6000.0, 10000.0, prefill_slo, SLO_MS) == (split.prefill_share, split.decode_share)
    # Heavier prefill moves share to prefill; loads nothing can carry give no split.
    heavy = recommend_split(prefill, decode, 14000.0, 1000.0, prefill_slo, SLO_MS)
    assert heavy == (0.75, 0.25)
    assert recommend_split(prefill, decode, 30000.0, 1000.0, prefill_slo, SLO_MS) is None
    assert recommend_split(prefill, decode, 1000.0, 1000.0, prefill_slo, 1.0) is None
