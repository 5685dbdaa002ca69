"""What each run means in the simulator: sizing, ablations, and the ScaledObject-driven elastic run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.workloads import Request
from services.experiment.baselines import RUNS, demand, sim_config
from services.experiment.config import ConfigError, parse
from services.sim.profile import load_profile

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "experiments/profiles/tiny-cpu.json"


def _requests() -> list[Request]:
    # 1 req/s for 120 s, then 5 req/s for 60 s: the busiest minute is 5x the first
    quiet = [Request(float(t), 100, 50) for t in range(120)]
    busy = [Request(120 + t / 5, 100, 50) for t in range(300)]
    return quiet + busy


def _cfg(**sim) -> object:
    return parse({"name": "t", "runs": list(RUNS), "sim": {"profile": str(PROFILE), "gpus": 64, **sim},
                  "slo": {"ttft_s": 1.0, "tpot_s": 0.1}})


def test_demand_finds_the_busiest_minute_and_the_mean():
    need = demand(_requests())
    assert need.peak["prefill"] == pytest.approx(500.0)  # 5 req/s x 100 tokens
    assert need.peak["decode"] == pytest.approx(250.0)
    assert need.start["prefill"] == pytest.approx(100.0)
    assert need.mean["prefill"] == pytest.approx(420 * 100 / 179.8, rel=1e-3)


def test_static_runs_are_sized_from_capacity_and_never_scale():
    cfg, profile, need = _cfg(), load_profile(PROFILE), demand(_requests())
    peak, mean = sim_config(cfg, "static_peak", profile, need), sim_config(cfg, "static_mean", profile, need)
    for stage in ("prefill", "decode"):
        c = peak.controls[stage]
        assert c.kind == "static" and c.min_replicas == c.max_replicas == c.replicas
        cap = peak.plans[stage].tokens_per_s * cfg.sim.target_utilization
        assert c.replicas == max(math.ceil(need.peak[stage] / cap), 1)
        assert mean.controls[stage].replicas <= c.replicas


def test_ablations_switch_off_one_mechanism_each():
    cfg, profile, need = _cfg(), load_profile(PROFILE), demand(_requests())
    base = sim_config(cfg, "elastic_tuned", profile, need).controls["decode"].policy
    assert base.ema_half_life_s > 0 and base.scale_down_cooldown_s > 0
    assert sim_config(cfg, "no_smoothing", profile, need).controls["decode"].policy.ema_half_life_s == 0
    nocool = sim_config(cfg, "no_cooldown", profile, need).controls["decode"].policy
    assert nocool.scale_up_cooldown_s == nocool.scale_down_cooldown_s == 0
    sym = sim_config(cfg, "symmetric", profile, need).controls["decode"].policy
    assert sym.scale_down_max_step == sym.scale_up_max_step and sym.scale_down_window_s == 0
    assert sim_config(cfg, "no_deadline", profile, need).controls["decode"].deadline_signal is False
    assert sim_config(cfg, "elastic_tuned", profile, need).table is not None
    untuned = sim_config(cfg, "no_tuning", profile, need)
    assert untuned.table is None and untuned.plans["decode"].share == 1.0
    threshold = sim_config(cfg, "keda_threshold", profile, need).controls["decode"]
    assert threshold.kind == "threshold" and threshold.threshold == 5.0


def test_elastic_run_follows_the_local_scaledobjects():
    cfg, profile, need = _cfg(scaledobjects=str(REPO / "k8s/local")), load_profile(PROFILE), demand(_requests())
    controls = sim_config(cfg, "elastic", profile, need).controls
    decode, prefill = controls["decode"], controls["prefill"]
    assert decode.policy.pod_tokens_per_s() == 250.0 and prefill.policy.pod_tokens_per_s() == 2000.0
    assert decode.policy.ema_half_life_s == 5.0 and decode.max_replicas == 4
    assert decode.behavior.scale_down.stabilization_window_s == 20


def test_policy_step_limits_from_the_config_reach_the_elastic_runs():
    cfg = parse({"name": "t", "runs": ["elastic_tuned"], "sim": {"profile": str(PROFILE), "gpus": 64},
                 "policy": {"scale_up_max_step": {"pods": 2, "percent": 25}, "scale_down_window_s": 600}})
    profile, need = load_profile(PROFILE), demand(_requests())
    policy = sim_config(cfg, "elastic_tuned", profile, need).controls["prefill"].policy
    assert (policy.scale_up_max_step.pods, policy.scale_up_max_step.percent) == (2, 25.0)
    assert policy.scale_up_max_step.up(12) == 3 and policy.scale_down_window_s == 600
    assert sim_config(cfg, "symmetric", profile, need).controls["prefill"].policy.scale_down_max_step.pods == 2


@pytest.mark.parametrize("step", [{"pods": 0}, {"percent": -5}, {"pods": "many"}, {"size": 2}, 3])
def test_a_bad_step_limit_names_the_field(step):
    with pytest.raises(ConfigError, match=r"policy\.scale_up_max_step"):
        parse({"name": "t", "runs": ["elastic"], "policy": {"scale_up_max_step": step}})
