"""Step timing profile (services/engine/profile.py): the ring, aggregates and the fitted
service-time model the tuner and the simulator read."""

from __future__ import annotations

import random

from services.engine.profile import StepProfile, StepRecord


def _record(decode: int, prefill: int, context: int, ms: float) -> StepRecord:
    return StepRecord(0.0, decode + (1 if prefill else 0), decode, prefill, context, ms)


def test_ring_is_bounded_and_keeps_the_newest():
    p = StepProfile(capacity=5)
    for i in range(12):
        p.record(_record(i, 0, 0, float(i)))
    assert len(p) == 5
    assert [r.ms for r in p.records()] == [7.0, 8.0, 9.0, 10.0, 11.0]


def test_summary_aggregates():
    p = StepProfile()
    assert p.summary() == {"steps": 0}
    for ms in (1.0, 2.0, 3.0, 4.0):
        p.record(_record(4, 8, 100, ms))
    s = p.summary()
    assert s["steps"] == 4 and s["ms_mean"] == 2.5 and s["ms_p50"] == 3.0 and s["ms_p95"] == 4.0
    assert s["decode_tokens"] == 16 and s["prefill_tokens"] == 32 and s["batch_mean"] == 5
    assert abs(s["tokens_per_busy_s"] - 48 / 0.010) < 1e-6


def test_fit_recovers_a_known_service_time_model():
    rng = random.Random(0)
    p = StepProfile()
    for _ in range(200):
        d, f, c = rng.randint(1, 64), rng.choice([0, 0, 64, 256]), rng.randint(100, 20000)
        p.record(_record(d, f, c, 3.0 + 0.2 * d + 0.05 * f + 0.001 * c + rng.uniform(-0.01, 0.01)))
    m = p.fit()
    assert m is not None and m.samples == 200
    assert abs(m.base_ms - 3.0) < 0.05 and abs(m.per_decode_ms - 0.2) < 0.002
    assert abs(m.per_prefill_ms - 0.05) < 0.001 and abs(m.per_context_ms - 0.001) < 1e-5
    assert abs(m.predict(32, 256, 5000) - (3.0 + 6.4 + 12.8 + 5.0)) < 0.1


def test_fit_without_prefill_steps_gives_zero_prefill_cost():
    p = StepProfile()
    assert p.fit() is None  # nothing recorded
    for d in range(1, 30):
        p.record(_record(d, 0, 0, 2.0 + 0.5 * d))
    m = p.fit()
    assert m.per_prefill_ms == 0.0 and m.per_context_ms == 0.0
    assert abs(m.base_ms - 2.0) < 1e-6 and abs(m.per_decode_ms - 0.5) < 1e-6
