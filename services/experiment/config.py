"""An experiment's YAML config as typed objects. Bad input raises ConfigError naming the field.

    name: azure-headline          # results go to <out>/<name>-<timestamp>/
    seed: 0
    mode: sim                     # sim | real (the local stack: elastune up --autoscale)
    workload:
      kind: trace                 # trace | poisson | gamma | onoff | steps
      path: ""                    # trace file (default: the shared Azure conversation trace)
      rate_multiplier: 1.0        # superpose this many jittered copies (keeps the trace's shape)
      rate_scale: 1.0             # replay this many times faster (shortens the trace)
      start_s: 0                  # trace window start
      duration_s: 0               # window length / synthetic duration (0: the whole trace)
      rate: 4.0                   # poisson/gamma: req/s; onoff: rate while on
      cv: 2.0                     # gamma
      mean_on_s: 5.0              # onoff
      mean_off_s: 10.0
      steps: [[0, 2.0], [60, 8.0]]  # steps: (start s, req/s) segments of Poisson load
      prompt_median: 256          # synthetic lengths (lognormal)
      output_median: 128
      max_context: 0              # scale lengths so prompt + output fits (0: leave them)
      max_output: 0
    slo: {ttft_s: 2.0, tpot_s: 0.1}
    runs: [static_peak, elastic_tuned]   # see services/experiment/baselines.py
    sim:
      profile: experiments/profiles/h100-llama3-8b.json
      gpus: 16
      interval_s: 15              # KEDA polling = scaler decision interval
      window_s: 5                 # load report window
      drain_limit_s: 1800
      target_utilization: 0.8     # static sizing and the policy
      prefill_slo_fraction: 0.5   # a prefill micro-batch may take this share of the TTFT SLO
      scaledobjects: ""           # e.g. k8s/local: the `elastic` run scales as these ScaledObjects
                                  # say (trigger metadata -> policy, behavior -> HPA), as real mode
      shared_host: true           # false: drop the profile's shared host (stack.host_cores): each pod
                                  # gets its own device share, e.g. the tiny CPU profile as a cluster
    moe:                          # sim only: an MoE model's experts stage (services/sim/moe.py); off by default
      experts: 0                  # experts per MoE layer (0: a dense model, no experts stage)
      top_k: 2                    # experts per token
      groups: 4                   # expert groups (stages experts/g0 ...), each scaled on its own
      skew: 0.0                   # Zipf exponent of expert popularity (expert 0 hottest; 0: uniform)
      slo_fraction: 0.5           # the share of the TPOT SLO a step may spend on its experts calls
    policy: {}                    # StagePolicyConfig overrides for elastune runs (field: value;
                                  # scale_up_max_step / scale_down_max_step as {pods: n, percent: p})
    hpa:                          # the ScaledObject's HPA behaviour in sim runs
      tolerance: 0.1
      scale_down_window_s: 30
      scale_down_pods: 1
      scale_down_period_s: 15
    real:
      scaledobjects: k8s/local
      model: ""
      port: 0                     # 0: a free port
      vocab: 4096
      sample_s: 1.0               # how often replicas are sampled
      api: http                   # load client: http (OpenAI streaming) | grpc (the gateway's Generate)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from services.scaler.signals import StepLimit

MODES = ("sim", "real")
WORKLOADS = ("trace", "poisson", "gamma", "onoff", "steps")


class ConfigError(ValueError):
    """A missing or bad config value; the message names the field and what is allowed."""


@dataclass(frozen=True)
class WorkloadConfig:
    kind: str = "trace"
    path: str = ""
    rate_multiplier: float = 1.0
    rate_scale: float = 1.0
    start_s: float = 0.0
    duration_s: float = 0.0
    rate: float = 4.0
    cv: float = 2.0
    mean_on_s: float = 5.0
    mean_off_s: float = 10.0
    steps: tuple[tuple[float, float], ...] = ()
    prompt_median: float = 256.0
    output_median: float = 128.0
    max_context: int = 0
    max_output: int = 0


@dataclass(frozen=True)
class SimSection:
    profile: str = "experiments/profiles/h100-llama3-8b.json"
    gpus: int = 16
    interval_s: float = 15.0
    window_s: float = 5.0
    drain_limit_s: float = 1800.0
    target_utilization: float = 0.8
    prefill_slo_fraction: float = 0.5
    scaledobjects: str = ""  # the `elastic` run takes its policy and HPA from these ScaledObjects
    shared_host: bool = True  # false: ignore the profile's stack.host_cores (pods on their own devices)


@dataclass(frozen=True)
class MoeSection:
    experts: int = 0
    top_k: int = 2
    groups: int = 4
    skew: float = 0.0
    slo_fraction: float = 0.5

    @property
    def on(self) -> bool:
        return self.experts > 0


@dataclass(frozen=True)
class HpaSection:
    tolerance: float = 0.1
    scale_down_window_s: int = 30
    scale_down_pods: int = 1
    scale_down_period_s: int = 15


@dataclass(frozen=True)
class RealSection:
    scaledobjects: str = "k8s/local"
    model: str = ""
    port: int = 0
    vocab: int = 4096
    sample_s: float = 1.0
    api: str = "http"  # the load client's API: "http" (OpenAI streaming) or "grpc" (Gateway.Generate)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    runs: tuple[str, ...]
    seed: int = 0
    mode: str = "sim"
    workload: WorkloadConfig = WorkloadConfig()
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.1
    sim: SimSection = SimSection()
    policy: dict[str, Any] = field(default_factory=dict)
    hpa: HpaSection = HpaSection()
    real: RealSection = RealSection()
    source: str = ""
    moe: MoeSection = MoeSection()


def _section(cls, node: Any, path: str):
    if node is None:
        return cls()
    if not isinstance(node, dict):
        raise ConfigError(f"{path} must be a mapping, got {node!r}")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in node.items():
        if key not in known:
            raise ConfigError(f"{path}.{key} is not a known field; known: {', '.join(sorted(known))}")
        default = getattr(cls(), key)
        try:
            if key == "steps":
                value = tuple((float(t), float(r)) for t, r in value)
                if any(r < 0 for _, r in value) or list(value) != sorted(value):
                    raise ValueError("want sorted [start_s, rate >= 0] pairs")
            elif isinstance(default, bool):
                value = bool(value)
            elif isinstance(default, (int, float)) and not isinstance(default, bool):
                value = type(default)(value)
                if value < 0:
                    raise ValueError("want a number >= 0")
            elif isinstance(default, str):
                value = str(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}.{key}={value!r} is invalid: {exc}") from exc
        values[key] = value
    return cls(**values)


STEP_FIELDS = ("scale_up_max_step", "scale_down_max_step")


def _step_limit(value: Any, where: str) -> StepLimit:
    """policy.scale_up_max_step / scale_down_max_step: {pods: n >= 1, percent: p >= 0}."""
    if not isinstance(value, dict) or not set(value) <= {"pods", "percent"}:
        raise ConfigError(f"{where} must be {{pods: n, percent: p}}, got {value!r}")
    try:
        pods, percent = int(value.get("pods", 1)), float(value.get("percent", 0.0))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} must be {{pods: n, percent: p}}: {exc}") from exc
    if pods < 1 or not percent >= 0:
        raise ConfigError(f"{where}: pods must be >= 1 and percent >= 0, got {value!r}")
    return StepLimit(pods, percent)


def parse(doc: Any, source: str = "<config>") -> ExperimentConfig:
    from .baselines import RUNS  # the known run names live with their definitions

    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: the config must be a mapping")
    name = doc.get("name")
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"{source}: name must be letters, digits, - and _, got {name!r}")
    runs = doc.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"{source}: runs must be a non-empty list of {', '.join(RUNS)}")
    for run in runs:
        if run not in RUNS:
            raise ConfigError(f"{source}: runs: unknown run {run!r}; known: {', '.join(RUNS)}")
    mode = doc.get("mode", "sim")
    if mode not in MODES:
        raise ConfigError(f"{source}: mode must be one of {MODES}, got {mode!r}")
    workload = _section(WorkloadConfig, doc.get("workload"), "workload")
    if workload.kind not in WORKLOADS:
        raise ConfigError(f"{source}: workload.kind must be one of {WORKLOADS}, got {workload.kind!r}")
    slo = doc.get("slo") or {}
    try:
        ttft, tpot = float(slo.get("ttft_s", 2.0)), float(slo.get("tpot_s", 0.1))
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{source}: slo must be {{ttft_s: s, tpot_s: s}}: {exc}") from exc
    if ttft <= 0 or tpot <= 0:
        raise ConfigError(f"{source}: slo.ttft_s and slo.tpot_s must be > 0")
    policy = doc.get("policy") or {}
    if not isinstance(policy, dict):
        raise ConfigError(f"{source}: policy must be a mapping of StagePolicyConfig fields")
    policy = {k: _step_limit(v, f"{source}: policy.{k}") if k in STEP_FIELDS else v for k, v in policy.items()}
    sim = _section(SimSection, doc.get("sim"), "sim")
    if sim.gpus < 1 or sim.interval_s <= 0 or sim.window_s <= 0:
        raise ConfigError(f"{source}: sim.gpus must be >= 1 and sim.interval_s, sim.window_s > 0")
    real = _section(RealSection, doc.get("real"), "real")
    if real.api not in ("http", "grpc"):
        raise ConfigError(f"{source}: real.api must be http or grpc, got {real.api!r}")
    moe = _section(MoeSection, doc.get("moe"), "moe")
    if moe.on:
        from services.sim.moe import MoeSpec

        try:
            MoeSpec(moe.experts, moe.top_k, moe.groups, moe.skew)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        if not 0 < moe.slo_fraction <= 1:
            raise ConfigError(f"{source}: moe.slo_fraction must be in (0, 1], got {moe.slo_fraction}")
        if mode != "sim":
            raise ConfigError(f"{source}: moe is simulated only (mode: sim); the real stack's MoE runs are "
                              "not part of `experiment run` yet")
    return ExperimentConfig(
        name=name, runs=tuple(runs), seed=int(doc.get("seed", 0)), mode=mode, workload=workload,
        slo_ttft_s=ttft, slo_tpot_s=tpot, sim=sim, policy=dict(policy),
        hpa=_section(HpaSection, doc.get("hpa"), "hpa"), real=real,
        source=source, moe=moe,
    )


def load(path: str | Path) -> ExperimentConfig:
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse(doc, str(path))
