"""elastune's replica policy: responsiveness, stability, checkpointing and every reason."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Callable

import pytest

from services.scaler import signals as sig
from services.scaler.policy import apply_ratio_band, decide, ema_alpha
from services.scaler.signals import (
    ConstantCapacity,
    ControllerState,
    Decision,
    StagePolicyConfig,
    StageSignals,
)

POD = 1000.0  # tokens/s per pod; with target_utilization 0.8 one pod's worth of need is 800/s
CFG = StagePolicyConfig(stage="prefill", tokens_per_s_per_pod=POD)


def rate_for(need: float) -> float:
    return need * POD * CFG.target_utilization


def simulate(
    load: Callable[[float], float], steps: int, ready: int, seed: int, noise: float, startup_s: float = 45.0
) -> list[Decision]:
    """Closed loop, one decision per 15 s; new pods report after startup_s, removed pods go at once."""
    rng = random.Random(seed)
    state, starting, decisions = ControllerState(), [], []
    for i in range(steps):
        now = i * 15.0
        ready += sum(1 for t in starting if t <= now)
        starting = [t for t in starting if t > now]
        rate = load(now) * (1 + rng.uniform(-noise, noise))
        signals = StageSignals(now, ready, len(starting), prompt_tokens_per_s=rate)
        decision, state = decide(signals, CFG, state)
        have = ready + len(starting)
        if decision.desired > have:
            starting += [now + startup_s] * (decision.desired - have)
        elif decision.desired < have:
            cut = have - decision.desired
            dropped = min(cut, len(starting))
            starting, ready = starting[dropped:], ready - (cut - dropped)
        decisions.append(decision)
    return decisions


def reversals(counts: list[int]) -> int:
    """How often the direction of change flips."""
    flips, direction = 0, 0
    for before, after in zip(counts, counts[1:]):
        if after != before:
            step = 1 if after > before else -1
            flips += direction not in (0, step)
            direction = step
    return flips


def test_ema_alpha_is_time_aware() -> None:
    assert ema_alpha(30.0, 30.0) == pytest.approx(0.5)
    assert ema_alpha(0.0, 30.0) == 0.0 and ema_alpha(5.0, 0.0) == 1.0


def test_step_up_in_load_scales_up_at_once() -> None:
    decisions = simulate(lambda t: rate_for(2.0 if t < 300 else 6.0), steps=25, ready=2, seed=0, noise=0.0)
    assert all(d.desired == 2 for d in decisions[:20])
    assert max(d.desired for d in decisions[20:22]) > 2  # the first or second decision after it
    assert decisions[20].reason == sig.REASON_TOKEN_RATE


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_noisy_steady_load_does_not_flap(seed: int) -> None:
    decisions = simulate(lambda t: rate_for(4.0), steps=480, ready=4, seed=seed, noise=0.2)
    counts = [d.desired for d in decisions]
    assert reversals(counts) <= 2
    assert 3 <= counts[-1] <= 5


def test_square_wave_follows_steps_up_and_flips_at_most_twice_per_period() -> None:
    period, decisions_per_period = 1200.0, 80

    def load(t: float) -> float:
        return rate_for(2.0 if t % period < period / 2 else 8.0)

    counts = [d.desired for d in simulate(load, steps=6 * decisions_per_period, ready=2, seed=4, noise=0.1)]
    for k in range(6):
        window = counts[k * decisions_per_period : (k + 1) * decisions_per_period + 1]
        assert reversals(window) <= 2
        rise = k * decisions_per_period + decisions_per_period // 2  # first decision at high load
        assert max(counts[rise : rise + 2]) > counts[rise - 1]  # within 2 decisions of the step
        assert max(window) == 8


def test_checkpoint_round_trip_gives_identical_decisions() -> None:
    rng = random.Random(5)
    plain, restored = ControllerState(), ControllerState()
    for i in range(200):
        signals = StageSignals(
            now=i * 15.0,
            ready_replicas=rng.randint(1, 6),
            pending_replicas=rng.randint(0, 1),
            prompt_tokens_per_s=rate_for(rng.uniform(0.5, 7.0)),
            queued_tokens=rng.choice([0.0, 5000.0]),
            oldest_deadline_slack_s=rng.choice([float("inf"), 4.0]),
            kv_used_tokens=rng.uniform(0, 9000),
            kv_capacity_tokens=10_000.0,
            ttft_p95_s=rng.choice([None, 0.2, 0.9]),
        )
        config = replace(CFG, slo_ttft_s=0.5)
        first, plain = decide(signals, config, plain)
        restored = ControllerState.from_dict(json.loads(json.dumps(restored.to_dict())))
        second, restored = decide(signals, config, restored)
        assert first == second
        assert plain == restored


def one(signals: StageSignals, state: ControllerState = ControllerState(), **changes: object) -> Decision:
    return decide(signals, replace(CFG, **changes), state)[0]


def test_each_need_reason_fires() -> None:
    assert one(StageSignals(0.0, 2, prompt_tokens_per_s=rate_for(3.5))).reason == sig.REASON_TOKEN_RATE
    queue = StageSignals(
        0.0, 2, prompt_tokens_per_s=rate_for(1.0), queued_tokens=40_000.0, oldest_deadline_slack_s=5.0
    )
    assert one(queue).reason == sig.REASON_QUEUE_DEADLINE
    assert one(queue).needs[sig.REASON_QUEUE_DEADLINE] == pytest.approx((800 + 40_000 / 5) / POD)
    kv = StageSignals(0.0, 2, kv_used_tokens=19_000.0, kv_capacity_tokens=20_000.0)
    assert one(kv).reason == sig.REASON_KV_PRESSURE and one(kv).desired == 3
    slow = StageSignals(0.0, 2, prompt_tokens_per_s=rate_for(1.0), ttft_p95_s=2.0)
    decision = one(slow, slo_ttft_s=1.0)
    assert (decision.reason, decision.desired) == (sig.REASON_SLO_VIOLATION, 3)


def test_each_hold_and_bound_reason_fires() -> None:
    at4 = ControllerState(last_desired=4)
    def at(need: float) -> StageSignals:
        return StageSignals(0.0, 4, prompt_tokens_per_s=rate_for(need))

    assert one(at(4.3), at4).reason == sig.REASON_HOLD_DEAD_BAND
    assert one(at(3.5), at4).reason == sig.REASON_HOLD_STEADY
    recent = ControllerState(last_desired=4, last_scale_up_time=-5.0)
    assert one(at(7.0), recent).reason == sig.REASON_HOLD_COOLDOWN
    pending = StageSignals(0.0, 2, pending_replicas=2, prompt_tokens_per_s=rate_for(3.5))
    assert one(pending, at4).reason == sig.REASON_HOLD_PENDING and one(pending, at4).desired == 4
    idle = StageSignals(0.0, 1)
    assert one(idle, ControllerState(last_desired=1)).reason == sig.REASON_MIN
    below_min = one(idle, ControllerState(last_desired=0), min_replicas=2)
    assert (below_min.desired, below_min.reason) == (2, sig.REASON_MIN)
    flood = one(StageSignals(0.0, 16, prompt_tokens_per_s=rate_for(40.0)), ControllerState(last_desired=16))
    assert (flood.desired, flood.reason) == (16, sig.REASON_MAX)
    over = one(StageSignals(0.0, 20, prompt_tokens_per_s=rate_for(1.0)), ControllerState(last_desired=20))
    assert (over.desired, over.reason) == (16, sig.REASON_MAX)
    assert set(sig.ALL_REASONS) >= set(sig.NEED_REASONS)


def test_scale_down_only_when_n_minus_1_pods_suffice() -> None:
    now, quiet = 1000.0, StageSignals(1000.0, 5, prompt_tokens_per_s=rate_for(3.0))
    recent_peak = ControllerState(last_desired=5, need_history=((now - 60.0, 4.5),))
    blocked = one(quiet, recent_peak)
    assert (blocked.desired, blocked.reason) == (5, sig.REASON_HOLD_UNSAFE)  # 4 pods miss 4.5
    calm = ControllerState(last_desired=5, need_history=((now - 60.0, 3.2),))
    safe = one(quiet, calm)
    assert (safe.desired, safe.reason) == (4, sig.REASON_SCALE_DOWN_SAFE)  # one step at a time
    cooling = replace(calm, last_scale_up_time=now - 30.0)
    assert one(quiet, cooling).reason == sig.REASON_HOLD_COOLDOWN
    late = StageSignals(1000.0, 5, prompt_tokens_per_s=rate_for(3.0), ttft_p95_s=2.0)
    assert one(late, replace(calm, last_desired=7), slo_ttft_s=1.0).reason == sig.REASON_HOLD_UNSAFE


def test_capacity_model_hooks_and_ratio_band() -> None:
    half = StagePolicyConfig(stage="decode", tokens_per_s_per_pod=lambda share: 2000.0 * share, gpu_share=0.5)
    assert half.pod_tokens_per_s() == 1000.0 and half.resolved_rate_source() == "output"
    assert replace(CFG, tokens_per_s_per_pod=ConstantCapacity(50.0)).pod_tokens_per_s() == 50.0
    with pytest.raises(ValueError):
        StagePolicyConfig(stage="prefill", tokens_per_s_per_pod=1.0, min_replicas=5, max_replicas=2)
    assert apply_ratio_band(1, 4, (0.5, 2.0)) == (2, 4)
    assert apply_ratio_band(9, 2, (0.5, 2.0)) == (9, 5)
    assert apply_ratio_band(3, 3, (0.5, 2.0)) == (3, 3)
    assert apply_ratio_band(0, 0, (0.5, 2.0)) == (0, 0) and apply_ratio_band(1, 7, None) == (1, 7)
