"""What each run of an experiment means in the simulator: share, runtime config and scaling control.

| run                | share / config                 | scaling                                            |
| ------------------ | ------------------------------ | -------------------------------------------------- |
| static_peak        | default (1 GPU, profile config)| fixed: the busiest minute's load / (capacity x util)|
| static_peak_tuned  | tuned (knee share, best config)| fixed, sized the same way with the tuned capacity  |
| static_mean        | default                        | fixed: the mean load / (capacity x util)           |
| keda_threshold     | default                        | KEDA guide: requests waiting, AverageValue 5, HPA  |
|                    |                                | default behaviour (300 s scale-down window)        |
| elastic            | default                        | elastune policy, constant per-pod capacity         |
| elastic_tuned      | tuned                          | elastune policy, capacity from the tuning table,   |
|                    |                                | pods re-pick their config every interval           |
| no_smoothing       | tuned                          | elastic_tuned with EMA half-life 0                 |
| no_cooldown        | tuned                          | elastic_tuned with both cooldowns 0                |
| symmetric          | tuned                          | elastic_tuned, scale-down as fast as scale-up (same|
|                    |                                | step and cooldown, no window, no headroom)         |
| no_deadline        | tuned                          | elastic_tuned without the queue/deadline signal    |
| no_tuning          | default                        | elastic_tuned's policy without the table (= elastic)|

"default" is an untuned deployment: one whole GPU per pod and the profile's batch limits.
Every scaled run may grow a stage to twice its peak-sized count (MAX_OVER_PEAK), within the cluster.

MoE (the config's `moe:` block): every expert group (stage experts/<group>) is one more stage of
the run, sized and scaled as the table says, on its routed pairs/s: the workload's prompt + output
tokens/s x top_k x MoE layers x the group's share of the pairs. Its plan ("experts" rows: the
expert micro-batch and share) is tuned in the tuned runs; its policy has no latency SLO, as the
experts ScaledObject in k8s/base, and only prefill and decode take their control from
`sim.scaledobjects`. The static runs size prefill and decode for the expert wait at their groups'
planned size, not at idle groups (_static_moe_counts): each step waits on its experts at every MoE
layer, so idle-expert capacity would undersize them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from bench.workloads import Request
from services.autoscaler.hpa import DEFAULT_SCALE_UP, HPABehavior, HPAScalingPolicy, HPAScalingRules
from services.scaler.signals import StagePolicyConfig, StepLimit
from services.sim.control import StageControl
from services.sim.moe import MoeSpec, call_stretch, loaded_wait_ms
from services.sim.profile import Profile
from services.sim.simulator import STAGES, SimConfig
from services.sim.tuning import (StagePlan, Workload, build_table, default_plan, experts_wait_ms, plan_point,
                                 plan_stage)

from .config import ExperimentConfig

RUNS = ("static_peak", "static_peak_tuned", "static_mean", "keda_threshold", "elastic", "elastic_tuned",
        "no_smoothing", "no_cooldown", "symmetric", "no_deadline", "no_tuning")
TUNED = {"static_peak_tuned", "elastic_tuned", "no_smoothing", "no_cooldown", "symmetric", "no_deadline"}
PEAK_WINDOW_S = 60.0
MAX_OVER_PEAK = 2
START_S = 60  # the elastic runs start sized for the busiest minute among the first two
# MoE static sizing: the expert groups' target utilisation is tried at these fractions of the run's
GROUP_UTILIZATION_FRACTIONS = (1.0, 0.8, 0.6, 0.4)


@dataclass(frozen=True)
class Demand:
    """Per-stage token demand of a workload (tokens/s): the mean, and the busiest minute."""

    mean: dict[str, float]
    peak: dict[str, float]
    start: dict[str, float]  # the first minutes' peak: what an elastic deployment runs when the trace begins
    workload: Workload


def demand(requests: list[Request]) -> Demand:
    """Token demand by arrival: the peak is the busiest PEAK_WINDOW_S anywhere (sliding, 1 s steps)."""
    arrival = np.array([r.arrival_s for r in requests])
    prompt = np.array([r.prompt_tokens for r in requests], dtype=float)
    output = np.array([r.output_tokens for r in requests], dtype=float)
    seconds = np.floor(arrival).astype(int)
    span = max(float(arrival.max() - arrival.min()), PEAK_WINDOW_S)
    by = {"prefill": prompt, "decode": output, "tokens": prompt + output}  # tokens: what MoE layers route
    mean = {s: float(v.sum() / span) for s, v in by.items()}
    w = int(PEAK_WINDOW_S)
    sliding = {}
    for s, v in by.items():
        per_s = np.concatenate([np.bincount(seconds, weights=v), np.zeros(w)])
        sums = np.convolve(per_s, np.ones(w), mode="valid") / PEAK_WINDOW_S  # [t, t + w) for every t
        sliding[s] = sums
    peak = {s: float(v.max()) for s, v in sliding.items()}
    start = {s: float(v[: START_S].max()) for s, v in sliding.items()}
    return Demand(mean, peak, start, Workload(float(prompt.mean()), float(output.mean()), float((prompt**2).mean())))


def _policy(cfg: ExperimentConfig, stage: str, capacity: Any, share: float, max_replicas: int) -> StagePolicyConfig:
    base = StagePolicyConfig(
        stage=stage, tokens_per_s_per_pod=capacity, gpu_share=share,
        target_utilization=cfg.sim.target_utilization,
        slo_ttft_s=cfg.slo_ttft_s if stage == "prefill" else None,
        slo_itl_s=cfg.slo_tpot_s if stage == "decode" else None,
        min_replicas=1, max_replicas=max_replicas,
    )
    known = {f.name for f in fields(StagePolicyConfig)}
    overrides = {k: v for k, v in cfg.policy.items() if k in known and k not in ("stage", "tokens_per_s_per_pod")}
    return replace(base, **overrides)


def _ablate(run: str, policy: StagePolicyConfig) -> StagePolicyConfig:
    if run == "no_smoothing":
        return replace(policy, ema_half_life_s=0.0)
    if run == "no_cooldown":
        return replace(policy, scale_up_cooldown_s=0.0, scale_down_cooldown_s=0.0)
    if run == "symmetric":
        return replace(policy, scale_down_max_step=StepLimit(policy.scale_up_max_step.pods,
                                                             policy.scale_up_max_step.percent),
                       scale_down_cooldown_s=policy.scale_up_cooldown_s, scale_down_window_s=0.0,
                       scale_down_headroom=0.0)
    return policy


def _behavior(cfg: ExperimentConfig) -> HPABehavior:
    down = HPAScalingRules(cfg.hpa.scale_down_window_s, "Max",
                           (HPAScalingPolicy("Pods", cfg.hpa.scale_down_pods, cfg.hpa.scale_down_period_s),))
    return HPABehavior(DEFAULT_SCALE_UP, down)


def _from_scaledobjects(folder: str, stage: str, start: int) -> StageControl:
    """The stage's control exactly as its ScaledObject says: the trigger's metadata parsed by the
    scaler's own parser into the policy, the ScaledObject's bounds, HPA behavior and tolerance."""
    from services.autoscaler.scaledobject import load_dir
    from services.scaler.metadata import parse_trigger

    found = [so for so in load_dir(folder) if so.stage == stage]
    if not found:
        raise ValueError(f"{folder}: no ScaledObject for stage {stage}")
    so = found[0]
    policy = parse_trigger(so.triggers[0].metadata).policy
    return StageControl("elastune", replicas=min(max(start, so.min_replica_count, 1), so.max_replica_count),
                        policy=policy, min_replicas=max(so.min_replica_count, 1), max_replicas=so.max_replica_count,
                        behavior=so.behavior, tolerance=so.tolerance)


def moe_spec(cfg: ExperimentConfig) -> MoeSpec | None:
    m = cfg.moe
    return MoeSpec(m.experts, m.top_k, m.groups, m.skew) if m.on else None


def _group_demand(need: Demand, spec: MoeSpec, layers: int) -> tuple[dict[str, float], ...]:
    """(mean, peak, start) routed pairs/s per expert group."""
    per_token = {stage: spec.top_k * layers * share for stage, share in spec.group_shares().items()}
    return tuple({stage: figures["tokens"] * k for stage, k in per_token.items()}
                 for figures in (need.mean, need.peak, need.start))


def _static_moe_counts(profile: Profile, work: Workload, plans: dict[str, StagePlan], spec: MoeSpec,
                       load: dict[str, float], util: float, gpus: int) -> dict[str, int]:
    """Static replica counts for an MoE run, as capacity planning with the simulator's own queueing
    model would set them (without it, prefill and decode are sized for idle experts and miss).

    For each target utilisation of the expert groups (GROUP_UTILIZATION_FRACTIONS of the run's),
    the groups are sized for their routed pairs/s; then prefill and decode are sized for their
    plan's batch with every group's calls stretched as services/sim/moe.py stretches them
    (call_stretch at the group's utilisation, with every prefill and decode pod calling), which
    is repeated until the counts settle. The candidate with the fewest GPUs wins; one that needs more
    than the cluster is shrunk to fit it (placed first come, first served, a plan over the cluster
    would leave the last stages, the expert groups, unplaced and serve nothing)."""
    experts, group_plan = profile.experts_model(), plans["experts"]
    micro_batch = group_plan.config["max_batch_size"]
    points = {s: plan_point(profile, work, plans[s], spec) for s in STAGES}
    tokens = {s: p.throughput_tokens_per_s * p.latency_p50_ms / 1000.0 for s, p in points.items()}
    idle_ms = {s: experts_wait_ms(profile, spec, tokens[s]) for s in STAGES}

    def count(stage: str, per_pod: float, target: float) -> int:
        share = plans[stage.split("/")[0]].share
        return min(max(math.ceil(load[stage] / (per_pod * target)), 1), max(int(gpus / share + 1e-9), 1))

    best: tuple[float, dict[str, int]] | None = None
    for fraction in GROUP_UTILIZATION_FRACTIONS:
        groups = {g: count(g, group_plan.tokens_per_s, util * fraction) for g in spec.stages()}
        pods = {s: count(s, plans[s].tokens_per_s, util) for s in STAGES}
        for _ in range(20):
            callers = sum(pods.values())
            stretch = {g: call_stretch(load[g] / (n * group_plan.tokens_per_s), callers, n) for g, n in groups.items()}
            settled = {}
            for s in STAGES:
                wait = loaded_wait_ms(spec, experts, group_plan.share, micro_batch, tokens[s], stretch)
                settled[s] = count(s, tokens[s] / (points[s].latency_p50_ms - idle_ms[s] + wait) * 1000.0, util)
            if settled == pods:
                break
            pods = settled
        counts = {**pods, **groups}
        used = sum(plans[s.split("/")[0]].share * n for s, n in counts.items())
        if best is None or used < best[0] - 1e-9:
            best = (used, counts)
    used, counts = best
    if used > gpus + 1e-9:  # more than the cluster holds: every stage shrinks in proportion, one pod at least
        counts = {s: max(int(n * gpus / used), 1) for s, n in counts.items()}
    return counts


def sim_config(cfg: ExperimentConfig, run: str, profile: Profile, need: Demand) -> SimConfig:
    """The simulator set-up of one run (see the module docstring)."""
    work = need.workload
    spec = moe_spec(cfg)
    table = build_table(profile, work, moe=spec)
    slo_ms = {"prefill": cfg.slo_ttft_s * 1000 * cfg.sim.prefill_slo_fraction, "decode": cfg.slo_tpot_s * 1000}
    tuned = run in TUNED
    plans: dict[str, StagePlan] = {
        s: plan_stage(table, profile, s, slo_ms[s]) if tuned else default_plan(profile, work, s, spec) for s in STAGES
    }
    stages, mean, peak, start_load = STAGES, need.mean, need.peak, need.start
    if spec is not None:
        layers = profile.experts_model().layers
        # One expert micro-batch may hold the device for the step's experts budget over its layers.
        slo_ms["experts"] = cfg.slo_tpot_s * 1000 * cfg.moe.slo_fraction / layers
        plans["experts"] = (plan_stage(table, profile, "experts", slo_ms["experts"]) if tuned
                            else default_plan(profile, work, "experts", spec))
        stages = STAGES + spec.stages()
        group_mean, group_peak, group_start = _group_demand(need, spec, layers)
        mean, peak, start_load = {**mean, **group_mean}, {**peak, **group_peak}, {**need.start, **group_start}
    util = cfg.sim.target_utilization
    sized = {"static_peak": peak, "static_peak_tuned": peak, "static_mean": mean}.get(run)
    static_counts = (_static_moe_counts(profile, work, plans, spec, sized, util, cfg.sim.gpus)
                     if sized is not None and spec is not None else {})
    controls = {}
    for stage in stages:
        kind = stage.split("/")[0]  # the table's stage: every expert group runs the "experts" plan
        plan = plans[kind]
        fits = max(int(cfg.sim.gpus / plan.share + 1e-9), 1)
        at_peak = min(max(math.ceil(peak[stage] / (plan.tokens_per_s * util)), 1), fits)
        # maxReplicaCount as an operator sets it from capacity planning: twice the peak-sized count,
        # so one stage cannot take the GPUs the other stage needs (the cluster is shared).
        most = min(MAX_OVER_PEAK * at_peak, fits)
        if sized is not None:
            count = static_counts.get(stage) or min(max(math.ceil(sized[stage] / (plan.tokens_per_s * util)), 1), fits)
            controls[stage] = StageControl("static", replicas=count, min_replicas=count, max_replicas=count)
            continue
        start = min(max(math.ceil(start_load[stage] / (plan.tokens_per_s * util)), 1), most)
        if run == "elastic" and cfg.sim.scaledobjects and stage in STAGES:
            controls[stage] = _from_scaledobjects(cfg.sim.scaledobjects, stage, 1)
            continue
        if run == "keda_threshold":
            controls[stage] = StageControl("threshold", replicas=start, threshold=5.0, max_replicas=most,
                                           behavior=HPABehavior(), tolerance=cfg.hpa.tolerance)
            continue
        if tuned:
            def capacity(share: float, stage: str = kind, plan: StagePlan = plan) -> float:
                found = table.capacity_tokens_per_s(profile.name, stage, profile.device, share, slo_ms[stage])
                return found or plan.tokens_per_s
        else:
            capacity = plan.tokens_per_s
        policy = _ablate(run, _policy(cfg, stage, capacity, plan.share, most))
        controls[stage] = StageControl("elastune", replicas=start, policy=policy, max_replicas=most,
                                       behavior=_behavior(cfg), tolerance=cfg.hpa.tolerance,
                                       deadline_signal=run != "no_deadline")
    return SimConfig(
        profile=profile, controls=controls, plans=plans, gpus=cfg.sim.gpus, interval_s=cfg.sim.interval_s,
        window_s=cfg.sim.window_s, slo_ttft_s=cfg.slo_ttft_s, drain_limit_s=cfg.sim.drain_limit_s,
        table=table if tuned and run != "static_peak_tuned" else None, retune_slo_ms=slo_ms, seed=cfg.seed,
        moe=spec,
    )
