"""The Kubernetes HPA replica algorithm and KEDA's activation layer, as pure state machines.

Mirrors pkg/controller/podautoscaler (horizontal.go, replica_calculator.go) and KEDA's scale
executor. No I/O, no clock: calls take `now` (s). Go's `t.After(cutoff)` is `t > cutoff` here;
quantities are compared in milli-units, as the HPA does with `MilliValue()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULT_TOLERANCE = 0.1
LEGACY_DOWNSCALE_WINDOW_S = 300.0  # --horizontal-pod-autoscaler-downscale-stabilization


def metric_value(value_int: int, value_float: float) -> float:
    """What KEDA hands the HPA for (metricValue, metricValueFloat) or (targetSize, targetSizeFloat).

    The float field wins when > 0; negative, NaN or infinite reads as 0; then milli-quantised with Go's
    truncation, as KEDA builds the quantity with NewMilliQuantity(int64(v * 1000)).
    """
    value = value_float if value_float > 0 else float(value_int)
    if not math.isfinite(value) or value < 0:
        return 0.0
    return int(value * 1000) / 1000


target_size = metric_value  # a MetricSpec's target follows the same rule


@dataclass(frozen=True)
class MetricTarget:
    """An External metric target: type "AverageValue" or "Value"."""

    type: str
    value: float

    def __post_init__(self) -> None:
        if self.type not in ("AverageValue", "Value") or not self.value > 0:
            raise ValueError(f"need an AverageValue or Value target > 0, got {self}")


@dataclass(frozen=True)
class HPAScalingPolicy:
    """Allow at most `value` Pods or Percent of change within `period_s`."""

    type: str
    value: int
    period_s: int


@dataclass(frozen=True)
class HPAScalingRules:
    """One direction of `spec.behavior`."""

    stabilization_window_s: int
    select_policy: str = "Max"
    policies: tuple[HPAScalingPolicy, ...] = ()


# Kubernetes' defaults: up with no window, max(4 pods, 100%) per 15 s; down 100% per 15 s after 300 s.
_UP_POLICIES = (HPAScalingPolicy("Pods", 4, 15), HPAScalingPolicy("Percent", 100, 15))
DEFAULT_SCALE_UP = HPAScalingRules(0, "Max", _UP_POLICIES)
DEFAULT_SCALE_DOWN = HPAScalingRules(300, "Max", (HPAScalingPolicy("Percent", 100, 15),))


@dataclass(frozen=True)
class HPABehavior:
    """`spec.behavior` with Kubernetes' defaults."""

    scale_up: HPAScalingRules = DEFAULT_SCALE_UP
    scale_down: HPAScalingRules = DEFAULT_SCALE_DOWN


@dataclass(frozen=True)
class ScaleEvent:
    """A change of the scale target's replicas, by `source` ("hpa" or "keda")."""

    time: float
    from_replicas: int
    to_replicas: int
    source: str = "hpa"


@dataclass
class _Change:
    time: float
    change: int
    outdated: bool = False


def replicas_for_metric(
    target: MetricTarget, value: float, current: int, ready: int, tolerance: float = DEFAULT_TOLERANCE
) -> int:
    """One External metric's proposal (GetExternalPerPodMetricReplicas / GetExternalMetricReplicas).

    AverageValue works on the usage ratio against `current` (status replicas); with current 0
    the ratio is +Inf (scale to ceil(value/target)) or NaN for value 0 (stay at 0).
    Value scales the *ready* pod count by value/target; with current 0 it is ceil(ratio).
    """
    usage, goal = round(value * 1000), round(target.value * 1000)  # MilliValue()
    if target.type == "AverageValue":
        if current == 0:
            return 0 if usage == 0 else math.ceil(usage / goal)
        ratio = usage / (goal * current)
        return math.ceil(usage / goal) if abs(1.0 - ratio) > tolerance else current
    ratio = usage / goal
    if current == 0:
        return math.ceil(ratio)
    return current if abs(1.0 - ratio) <= tolerance else math.ceil(ratio * ready)


def rate_limit(
    current: int, ups: list[_Change], downs: list[_Change], rules: HPAScalingRules, now: float, up: bool
) -> int:
    """calculateScaleUpLimitWithScalingRules (up) / calculateScaleDownLimitWithBehaviors (down).

    Up: Pods adds, Percent multiplies and rounds up; "Max" takes the largest proposal.
    Down: Pods subtracts, Percent truncates like Go's int32(); "Max" takes the smallest.
    """
    if rules.select_policy == "Disabled" or not rules.policies:
        return current
    proposals = []
    for policy in rules.policies:
        # Replicas when the period began: current - added + removed within it (getReplicasChangePerPeriod).
        cutoff = now - policy.period_s
        added = sum(e.change for e in ups if e.time > cutoff)
        start = current - added + sum(e.change for e in downs if e.time > cutoff)
        if policy.type == "Pods":
            proposals.append(start + policy.value if up else start - policy.value)
        elif up:
            proposals.append(math.ceil(start * (1 + policy.value / 100)))
        else:
            proposals.append(int(start * (1 - policy.value / 100)))
    if rules.select_policy == "Min":  # the smallest change
        return min(proposals) if up else max(proposals)
    return max(proposals) if up else min(proposals)  # "Max": the biggest change


@dataclass
class HPA:
    """One HorizontalPodAutoscaler and the controller's memory of it.

    `behavior=None` means a HPA without `spec.behavior` (KEDA's default when the ScaledObject
    sets no `advanced.horizontalPodAutoscalerConfig.behavior`): the legacy path, with a 300 s
    scale-down window and a scale-up cap of max(2 * current, 4).
    """

    min_replicas: int = 1
    max_replicas: int = 100
    behavior: HPABehavior | None = HPABehavior()
    tolerance: float = DEFAULT_TOLERANCE
    recommendations: list[tuple[float, int]] = field(default_factory=list, init=False)
    scale_ups: list[_Change] = field(default_factory=list, init=False)
    scale_downs: list[_Change] = field(default_factory=list, init=False)
    events: list[ScaleEvent] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(self.min_replicas, 1):
            raise ValueError("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")

    def desired(
        self,
        current_replicas: int,
        metric_values: list[tuple[MetricTarget, float]],
        now: float,
        ready_replicas: int | None = None,
    ) -> int:
        """One reconcile: the replicas the HPA sets (and records as a scale event when changed).

        current 0 with min != 0 is "ScalingDisabled": the HPA returns 0 and does nothing;
        KEDA owns 0 <-> 1. `ready_replicas` (default: current) only matters for Value targets.
        """
        current = current_replicas
        if current == 0 and self.min_replicas != 0:
            return 0
        if current > self.max_replicas:
            desired = self.max_replicas
        elif current < self.min_replicas:
            desired = self.min_replicas
        else:
            if not metric_values:
                raise ValueError("a HPA needs at least one metric")
            ready = current if ready_replicas is None else ready_replicas
            # computeReplicasForMetrics: the largest proposal wins.
            proposal = max(replicas_for_metric(t, v, current, ready, self.tolerance) for t, v in metric_values)
            if self.behavior is None:
                desired = self._normalize_legacy(current, proposal, now)
            else:
                desired = self._normalize(current, proposal, now, self.behavior)
        if desired != current:
            self._store_event(current, desired, now)
        return desired

    def _normalize(self, current: int, proposal: int, now: float, behavior: HPABehavior) -> int:
        """normalizeDesiredReplicasWithBehaviors: stabilize, then rate-limit and clamp."""
        up_cutoff = now - behavior.scale_up.stabilization_window_s
        down_cutoff = now - behavior.scale_down.stabilization_window_s
        up_rec = down_rec = proposal
        for stamp, rec in self.recommendations:
            if stamp > up_cutoff:
                up_rec = min(up_rec, rec)
            if stamp > down_cutoff:
                down_rec = max(down_rec, rec)
        stabilized = min(max(current, up_rec), down_rec)
        # Samples before both cutoffs can never count again; Go reuses one such slot per call.
        self.recommendations = [(t, r) for t, r in self.recommendations if t >= up_cutoff or t >= down_cutoff]
        self.recommendations.append((now, proposal))
        # convertDesiredReplicasWithBehaviorRate: a limit never reverses the direction.
        up = stabilized > current
        rules = behavior.scale_up if up else behavior.scale_down
        limit = rate_limit(current, self.scale_ups, self.scale_downs, rules, now, up)
        if up:
            return min(stabilized, self.max_replicas, max(limit, current))
        if stabilized < current:
            return max(stabilized, self.min_replicas, min(limit, current))
        return stabilized

    def _normalize_legacy(self, current: int, proposal: int, now: float) -> int:
        """normalizeDesiredReplicas: max over the downscale window, then convertDesiredReplicasWithRules."""
        cutoff = now - LEGACY_DOWNSCALE_WINDOW_S
        self.recommendations = [(t, r) for t, r in self.recommendations if t >= cutoff]
        stabilized = max([proposal] + [r for _, r in self.recommendations])
        self.recommendations.append((now, proposal))
        up_cap = max(2 * current, 4)  # calculateScaleUpLimit: scaleUpLimitFactor 2, scaleUpLimitMinimum 4
        return max(self.min_replicas, min(stabilized, min(self.max_replicas, up_cap)))

    def _store_event(self, before: int, after: int, now: float) -> None:
        """storeScaleEvent: reuse the first event older than the longest policy period."""
        self.events.append(ScaleEvent(now, before, after))
        if self.behavior is None:
            return
        up = after > before
        rules = self.behavior.scale_up if up else self.behavior.scale_down
        events = self.scale_ups if up else self.scale_downs
        longest = max((p.period_s for p in rules.policies), default=0)
        for event in events:
            event.outdated = event.outdated or event.time < now - longest  # markScaleEventsOutdated
        fresh = _Change(now, abs(after - before))
        slot = next((i for i, event in enumerate(events) if event.outdated), None)
        if slot is None:
            events.append(fresh)
        else:
            events[slot] = fresh


@dataclass
class KedaScaledObjectState:
    """KEDA's executor for one ScaledObject over the HPA it owns, whose minReplicas is
    max(minReplicaCount, 1): only KEDA moves 0 <-> 1 (or idle). Call `step` every polling interval.
    """

    min_replica_count: int = 0
    max_replica_count: int = 100
    idle_replica_count: int | None = None
    cooldown_period_s: float = 300.0
    polling_interval_s: float = 30.0
    behavior: HPABehavior | None = HPABehavior()
    tolerance: float = DEFAULT_TOLERANCE
    last_active_time: float | None = None
    events: list[ScaleEvent] = field(default_factory=list)
    hpa: HPA = field(init=False)

    def __post_init__(self) -> None:
        if self.idle_replica_count is not None and self.idle_replica_count >= self.min_replica_count:
            raise ValueError("idleReplicaCount must be lower than minReplicaCount")
        self.hpa = HPA(max(self.min_replica_count, 1), self.max_replica_count, self.behavior, self.tolerance)

    def activation(self, now: float, is_active: bool, current_replicas: int) -> int | None:
        """KEDA's own move (scaleFromZeroOrIdle / scaleToZeroOrIdle), or None to leave it to the HPA."""
        current, idle = current_replicas, self.idle_replica_count
        if is_active:
            self.last_active_time = now
            if current == 0 or (idle is not None and current < self.min_replica_count):
                return max(self.min_replica_count, 1)
            return None
        if (idle is not None and current > idle) or (current > 0 and self.min_replica_count == 0):
            last = self.last_active_time
            if last is None or last + self.cooldown_period_s < now:  # no LastActiveTime: at once
                return idle if idle is not None else self.min_replica_count
        return None

    def step(
        self,
        now: float,
        is_active: bool,
        metric_values: list[tuple[MetricTarget, float]],
        current_replicas: int,
        ready_replicas: int | None = None,
    ) -> int:
        """The replicas the scale target should have after this poll."""
        target = self.activation(now, is_active, current_replicas)
        source = "hpa" if target is None else "keda"
        if target is None:
            target = self.hpa.desired(current_replicas, metric_values, now, ready_replicas)
        if target != current_replicas:
            self.events.append(ScaleEvent(now, current_replicas, target, source))
        return target
