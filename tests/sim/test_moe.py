"""The simulator's experts stage (MoE): routing skew, service time, the step's wait on its expert
groups, scaling the groups through the real scaler's aggregation + policy + HPA, and that a run
without experts is exactly what it was before the stage existed."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict

import numpy as np
import pytest

from services.autoscaler.hpa import DEFAULT_SCALE_UP, HPABehavior, HPAScalingPolicy, HPAScalingRules
from services.scaler.signals import StagePolicyConfig
from services.sim.control import StageControl
from services.sim.moe import MoeSpec
from services.sim.profile import DecodeModel, ExpertsModel, PrefillModel, Profile, profile_from_dict
from services.sim.simulator import SimConfig, simulate
from services.sim.tuning import StagePlan

SPEC = MoeSpec(experts=8, top_k=2, groups=4, skew=1.2)
DECODE = DecodeModel(weight_ms=2.0, kv_ms_per_token=0.0, compute_ms_per_seq=0.05, combine="sum",
                     max_batch_size=64, kv_capacity_tokens=10**7)
PREFILL = PrefillModel(overhead_ms=1.0, ms_per_token=0.01)


def _profile(experts: ExpertsModel, cold: float = 0.0) -> Profile:
    return Profile("moe-test", "hand-made", "test", PREFILL, DECODE, 0.0,
                   {"prefill": cold, "decode": cold, "experts": cold}, experts=experts)


def _plans(experts_share: float = 1.0, micro_batch: int = 256) -> dict:
    return {"prefill": StagePlan("prefill", 1.0, {"max_batch_tokens": 4096}, 1.0),
            "decode": StagePlan("decode", 1.0, {"max_batch_size": 64}, 1.0),
            "experts": StagePlan("experts", experts_share, {"max_batch_size": micro_batch}, 1.0)}


def _static(n: int) -> StageControl:
    return StageControl("static", replicas=n, min_replicas=n, max_replicas=n)


def _elastic(stage: str, capacity: float, down_window_s: float = 0.0) -> StageControl:
    policy = StagePolicyConfig(stage=stage, tokens_per_s_per_pod=capacity, ema_half_life_s=0.0,
                               scale_up_cooldown_s=0.0, scale_down_cooldown_s=0.0,
                               scale_down_window_s=down_window_s, dead_band=0.0, max_replicas=30)
    quick_down = HPAScalingRules(0, "Max", (HPAScalingPolicy("Percent", 100, 15),))
    return StageControl("elastune", replicas=1, policy=policy, max_replicas=30,
                        behavior=HPABehavior(DEFAULT_SCALE_UP, quick_down))


def _controls(groups: StageControl | dict, prefill: int = 4, decode: int = 8) -> dict:
    per_group = groups if isinstance(groups, dict) else {s: groups for s in SPEC.stages()}
    return {"prefill": _static(prefill), "decode": _static(decode), **per_group}


def _burst(n: int = 4000, seed: int = 0) -> tuple[list[float], list[int], list[int]]:
    """n requests in the first 40 s, then a trickle (1 req/s) to 160 s."""
    rng = np.random.default_rng(seed)
    quiet = 40 + np.cumsum(rng.exponential(1.0, 120))
    arrivals = np.sort(np.concatenate([rng.uniform(0, 40, n), quiet[quiet < 160]])).tolist()
    m = len(arrivals)
    return arrivals, rng.integers(16, 128, m).tolist(), rng.integers(16, 96, m).tolist()


def test_zipf_skew_makes_group_g0_hot_and_skew_zero_is_even():
    shares = SPEC.group_shares()
    assert list(shares) == ["experts/g0", "experts/g1", "experts/g2", "experts/g3"]
    assert sum(shares.values()) == pytest.approx(1.0)
    values = list(shares.values())
    assert values == sorted(values, reverse=True) and values[0] > 4 * values[-1]
    # experts 0, 1 of weights 1, 2^-1.2 over the sum of (e + 1)^-1.2 for e < 8
    total = sum((e + 1) ** -1.2 for e in range(8))
    assert shares["experts/g0"] == pytest.approx((1 + 2 ** -1.2) / total)
    assert list(MoeSpec(8, 2, 4, 0.0).group_shares().values()) == pytest.approx([0.25] * 4)
    with pytest.raises(ValueError, match="top_k"):
        MoeSpec(experts=4, top_k=5, groups=2)
    with pytest.raises(ValueError, match="groups"):
        MoeSpec(experts=4, top_k=2, groups=5)


def test_experts_call_pays_every_micro_batch_and_slows_with_the_share():
    model = ExpertsModel(piece_ms=2.0, ms_per_pair=0.01, overhead_ms=0.5, layers=3)
    assert model.call_ms(0, 1.0, 256) == 0.0
    assert model.call_ms(100, 1.0, 256) == pytest.approx(0.5 + 2.0 + 1.0)
    assert model.call_ms(600, 0.5, 256) == pytest.approx(0.5 + (3 * 2.0 + 6.0) / 0.5)  # 3 pieces
    derived = ExpertsModel.derived(DECODE)
    assert derived.piece_ms == DECODE.weight_ms / 2 and "derived" in derived.source
    data = {"name": "p", "prefill": {"overhead_ms": 1, "ms_per_token": 0.1},
            "decode": {"weight_ms": 1, "kv_ms_per_token": 0, "compute_ms_per_seq": 0.1},
            "experts": {"piece_ms": 2, "ms_per_pair": 0.01, "layers": 4, "max_batch_size": 64}}
    assert profile_from_dict(data).experts_model() == ExpertsModel(2.0, 0.01, 0.0, 4, 64)
    with pytest.raises(ValueError, match="piece_ms"):
        profile_from_dict({**data, "experts": {"ms_per_pair": 0.01}})


def test_lone_sequence_steps_at_dense_step_plus_its_slowest_group_per_layer():
    experts = ExpertsModel(piece_ms=3.0, ms_per_pair=0.5, overhead_ms=1.0, layers=2)
    cfg = SimConfig(_profile(experts), _controls(_static(1), prefill=1, decode=1), _plans(), gpus=8,
                    interval_s=5.0, moe=SPEC)
    data = simulate(cfg, [0.0], [10], [41])
    # one token: 2 pairs, g0's share of them the largest call: 1 + 3 + 0.5 * 2 * share(g0) ms per layer
    g0 = SPEC.group_shares()["experts/g0"]
    step_ms = (2.0 + 0.05) + 2 * (1.0 + 3.0 + 0.5 * 2 * g0)
    assert data.tpot_s[0] == pytest.approx(step_ms / 1000, rel=1e-9)
    prefill_ms = 1.0 + 0.1 + 2 * (1.0 + 3.0 + 0.5 * 10 * 2 * g0)  # the prompt's 10 tokens, routed too
    assert data.ttft_s[0] == pytest.approx(prefill_ms / 1000, rel=1e-9)


def test_slower_expert_groups_raise_decode_step_time():
    arrivals, prompts, outputs = _burst(n=1500)
    runs = {}
    for name, experts in {"fast": ExpertsModel(piece_ms=0.2, ms_per_pair=0.001, layers=4),
                          "slow": ExpertsModel(piece_ms=2.0, ms_per_pair=0.01, layers=4)}.items():
        cfg = SimConfig(_profile(experts), _controls(_static(2)), _plans(), gpus=32, interval_s=5.0, moe=SPEC)
        runs[name] = simulate(cfg, arrivals, prompts, outputs)
    dense_cfg = SimConfig(_profile(ExpertsModel(1.0, 1.0)), _controls(_static(2)), _plans(), gpus=32, interval_s=5.0)
    dense = simulate(dense_cfg, arrivals, prompts, outputs)  # moe off: the profile's experts block is not used
    tpot = {name: np.mean([t for t in d.tpot_s if t]) for name, d in {**runs, "dense": dense}.items()}
    assert all(s == "ok" for d in runs.values() for s in d.status)
    assert tpot["dense"] < tpot["fast"] < tpot["slow"]
    assert tpot["slow"] > 2 * tpot["fast"]
    itl = {name: np.average(d.itl_values, weights=d.itl_weights) for name, d in runs.items()}
    assert itl["slow"] > itl["fast"]


def test_skew_scales_the_hot_group_more_than_the_cold_ones():
    arrivals, prompts, outputs = _burst()
    experts = ExpertsModel(piece_ms=0.5, ms_per_pair=0.02, layers=2)
    groups = {s: _elastic(s, 4000.0) for s in SPEC.stages()}
    cfg = SimConfig(_profile(experts, cold=2.0), _controls(groups), _plans(), gpus=64, interval_s=2.0, moe=SPEC)
    data = simulate(cfg, arrivals, prompts, outputs)
    assert all(s == "ok" for s in data.status)
    peak = {s: max(x.ready for x in data.timeline if x.stage == s) for s in SPEC.stages()}
    mean = {s: np.mean([x.ready for x in data.timeline if x.stage == s]) for s in SPEC.stages()}
    assert peak["experts/g0"] > peak["experts/g1"] >= peak["experts/g3"]
    assert peak["experts/g0"] >= 3 * peak["experts/g3"]
    assert mean["experts/g0"] > 2 * mean["experts/g3"]
    # the signal is the routed pairs/s: the hot group's load is its share of the pairs
    load = {s: max(x.load_tokens_per_s for x in data.timeline if x.stage == s) for s in SPEC.stages()}
    shares = SPEC.group_shares()
    assert load["experts/g0"] / load["experts/g3"] == pytest.approx(shares["experts/g0"] / shares["experts/g3"],
                                                                    rel=0.05)
    # each group's GPU-seconds are its own, and they add up to the run's
    assert sum(data.share_seconds_by_stage.values()) == pytest.approx(data.share_seconds)
    assert data.share_seconds_by_stage["experts/g0"] > data.share_seconds_by_stage["experts/g3"]


def test_expert_group_scales_up_under_load_and_down_after_with_the_stabilisation_rules():
    arrivals, prompts, outputs = _burst()
    experts = ExpertsModel(piece_ms=0.5, ms_per_pair=0.02, layers=2)
    window = 20.0  # the policy's scale-down window: down only once the need has been low this long
    groups = {s: _elastic(s, 4000.0, down_window_s=window) for s in SPEC.stages()}
    cfg = SimConfig(_profile(experts, cold=2.0), _controls(groups), _plans(), gpus=64, interval_s=2.0, moe=SPEC)
    data = simulate(cfg, arrivals, prompts, outputs)
    changes = [c for c in data.changes if c.stage == "experts/g0"]
    ups = [c for c in changes if c.to_replicas > c.from_replicas]
    downs = [c for c in changes if c.to_replicas < c.from_replicas]
    assert ups and downs
    assert max(c.time for c in ups) < 40 < min(c.time for c in downs)  # up in the burst, down after it
    assert min(c.time for c in downs) >= 40 + window - 2.0  # the window held the count after the burst
    rows = [x for x in data.timeline if x.stage == "experts/g0"]
    assert max(x.ready for x in rows) >= 4 and rows[-1].ready + rows[-1].starting <= 2
    # HPA scale-up rule (max(4 pods, 100%) per 15 s, as KEDA's default): no poll more than doubles + 4
    for c in ups:
        assert c.to_replicas <= max(2 * c.from_replicas, c.from_replicas + 4)


# Recorded at commit 72b87ab (before the experts stage) with experiments/smoke-sim.yaml: a run
# without `moe` must give the same RunData, bit for bit, as it did then.
BEFORE_EXPERTS = {"elastic_tuned": "974c029354f17c27", "keda_threshold": "c324191f2bfcfd12"}


def test_runs_without_experts_are_bit_identical_to_before():
    from services.experiment.baselines import demand, sim_config
    from services.experiment.config import load
    from services.experiment.workload import build
    from services.sim.profile import load_profile

    cfg = load("experiments/smoke-sim.yaml")
    requests = build(cfg.workload, cfg.seed)
    profile, need = load_profile(cfg.sim.profile), demand(requests)
    columns = ([r.arrival_s for r in requests], [r.prompt_tokens for r in requests], [r.output_tokens for r in requests])
    for run, expected in BEFORE_EXPERTS.items():
        data = simulate(sim_config(cfg, run, profile, need), *columns)
        data.stats.pop("wall_s")
        fields = {k: v for k, v in asdict(data).items() if k != "share_seconds_by_stage"}  # added since
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
        assert digest == expected, run
        assert math.isclose(sum(data.share_seconds_by_stage.values()), data.share_seconds, rel_tol=1e-9)
