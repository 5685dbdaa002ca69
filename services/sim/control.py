"""The outer loop on the simulated clock: the same policy and KEDA/HPA code as the real stack. Pure.

Per stage and polling interval, a StageController turns the stage's StageSignals into the
replica count the scale target should have:

- "elastune": services.scaler.policy.decide() (EMA, needs, dead band, cooldowns, N-1 safety,
  pending guard) answers the desired count as the scaler's `desired` mode does (AverageValue
  target 1), and services.autoscaler.hpa.KedaScaledObjectState (KEDA's activation + the HPA
  algorithm with the ScaledObject's behavior) turns it into replicas;
- "threshold": the KEDA-guide baseline: metric = requests waiting for the stage, AverageValue
  target `threshold` (5), through the same KEDA/HPA code;
- "static": a fixed count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from services.autoscaler.hpa import HPABehavior, KedaScaledObjectState, MetricTarget
from services.scaler.policy import decide
from services.scaler.signals import ControllerState, Decision, StagePolicyConfig, StageSignals

KINDS = ("static", "elastune", "threshold")


@dataclass(frozen=True)
class StageControl:
    """How one stage is scaled in a run."""

    kind: str
    replicas: int = 1  # static: the count; others: the starting count
    policy: StagePolicyConfig | None = None  # elastune
    threshold: float = 5.0  # threshold: waiting requests per replica
    min_replicas: int = 1
    max_replicas: int = 16
    behavior: HPABehavior | None = HPABehavior()
    tolerance: float = 0.1
    deadline_signal: bool = True  # False: the policy never sees the backlog (ablation)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"control kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "elastune" and self.policy is None:
            raise ValueError("elastune control needs a policy")


class StageController:
    def __init__(self, control: StageControl):
        self.control = control
        self.state = ControllerState()
        self.last_decision: Decision | None = None
        self.keda = KedaScaledObjectState(
            min_replica_count=control.min_replicas, max_replica_count=control.max_replicas,
            behavior=control.behavior, tolerance=control.tolerance,
        )

    def target(self, signals: StageSignals, active: bool, current: int) -> int:
        """Replicas after this poll, given the scale target's current count."""
        c = self.control
        if c.kind == "static":
            return c.replicas
        if c.kind == "elastune":
            seen = signals if c.deadline_signal else replace(signals, queued_tokens=0.0, queue_len=0,
                                                             oldest_deadline_slack_s=math.inf)
            self.last_decision, self.state = decide(seen, c.policy, self.state)
            metric = (MetricTarget("AverageValue", 1.0), float(self.last_decision.desired))
        else:
            metric = (MetricTarget("AverageValue", c.threshold), float(signals.queue_len))
        return self.keda.step(signals.now, active, [metric], current, signals.ready_replicas)
