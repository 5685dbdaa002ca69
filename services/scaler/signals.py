"""Inputs, configuration, state and output of the outer (replica) control loop. Pure data."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

# Why a decision came out as it did: one place for every reason string.
REASON_TOKEN_RATE = "token_rate"  # scale up: arrival tokens/s over the pods' usable capacity
REASON_QUEUE_DEADLINE = "queue_deadline"  # scale up: the backlog must drain before its deadline
REASON_KV_PRESSURE = "kv_pressure"  # scale up: KV cache above the high watermark
REASON_SLO_VIOLATION = "slo_violation"  # scale up: smoothed p95 TTFT/ITL above the SLO
REASON_SCALE_DOWN_SAFE = "scale_down_safe"  # scale down: N-1 pods still meet the SLO
REASON_HOLD_STEADY = "hold_steady"  # the need rounds to the current count
REASON_HOLD_DEAD_BAND = "hold_dead_band"  # the need is within the dead band of the current count
REASON_HOLD_COOLDOWN = "hold_cooldown"  # too soon after the last scale event
REASON_HOLD_PENDING = "hold_pending"  # pods already asked for cover the need
REASON_HOLD_UNSAFE = "hold_unsafe"  # scale down refused: N-1 pods would miss the SLO
REASON_MIN = "min"  # clamped to (or raised to) min_replicas
REASON_MAX = "max"  # clamped to (or lowered to) max_replicas

NEED_REASONS = (REASON_TOKEN_RATE, REASON_QUEUE_DEADLINE, REASON_KV_PRESSURE, REASON_SLO_VIOLATION)
ALL_REASONS = NEED_REASONS + (
    REASON_SCALE_DOWN_SAFE,
    REASON_HOLD_STEADY,
    REASON_HOLD_DEAD_BAND,
    REASON_HOLD_COOLDOWN,
    REASON_HOLD_PENDING,
    REASON_HOLD_UNSAFE,
    REASON_MIN,
    REASON_MAX,
)


@dataclass(frozen=True)
class StageSignals:
    """What one stage looks like at one instant (sums over its ready pods)."""

    now: float
    ready_replicas: int
    pending_replicas: int = 0  # asked for, not reporting yet
    prompt_tokens_per_s: float = 0.0  # arrival rate of prompt tokens
    output_tokens_per_s: float = 0.0
    queued_tokens: float = 0.0
    queue_len: int = 0
    oldest_deadline_slack_s: float = math.inf  # inf: no queued request has a deadline
    kv_used_tokens: float = 0.0
    kv_capacity_tokens: float = 0.0
    ttft_p95_s: float | None = None
    itl_p95_s: float | None = None


@runtime_checkable
class CapacityModel(Protocol):
    """Tokens/s one pod sustains within the SLO at a GPU share (the tuning-table hook)."""

    def tokens_per_s(self, share: float) -> float: ...


@dataclass(frozen=True)
class ConstantCapacity:
    """The same capacity whatever the share."""

    value: float

    def tokens_per_s(self, share: float) -> float:
        return self.value


@dataclass(frozen=True)
class StepLimit:
    """The most one decision may move: max(pods, percent of the current count), at least 1."""

    pods: int = 1
    percent: float = 0.0

    def up(self, current: int) -> int:
        return max(1, self.pods, math.ceil(current * self.percent / 100))

    def down(self, current: int) -> int:
        return max(1, self.pods, math.floor(current * self.percent / 100))


@dataclass(frozen=True)
class StagePolicyConfig:
    """How one stage is scaled. Times in seconds, fractions in 0..1."""

    stage: str
    tokens_per_s_per_pod: float | CapacityModel | Callable[[float], float]
    gpu_share: float = 1.0
    rate_source: str | None = None  # "prompt" | "output" | "total"; None: from the stage name
    target_utilization: float = 0.8
    ema_half_life_s: float = 30.0
    slo_ttft_s: float | None = None
    slo_itl_s: float | None = None
    queue_drain_target_s: float = 10.0
    min_drain_s: float = 1.0  # floor of the drain window when a deadline is (nearly) missed
    kv_high_watermark: float = 0.85
    scale_up_max_step: StepLimit = StepLimit(pods=4, percent=100.0)
    scale_down_max_step: StepLimit = StepLimit(pods=1, percent=25.0)
    scale_up_cooldown_s: float = 15.0
    scale_down_cooldown_s: float = 60.0
    scale_down_window_s: float = 300.0  # scale down judged on the peak need over this window
    scale_down_headroom: float = 0.05  # ...which must fit in the new count with this much to spare
    dead_band: float = 0.1
    min_replicas: int = 1
    max_replicas: int = 16
    pd_ratio_band: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        if not 0 < self.target_utilization <= 1 or not 0 < self.kv_high_watermark <= 1:
            raise ValueError("target_utilization and kv_high_watermark must be in (0, 1]")
        if not 0 <= self.scale_down_headroom < 1 or not 0 <= self.dead_band < 1:
            raise ValueError("scale_down_headroom and dead_band must be in [0, 1)")
        if self.resolved_rate_source() not in ("prompt", "output", "total"):
            raise ValueError(f"unknown rate_source {self.rate_source!r}")

    def pod_tokens_per_s(self) -> float:
        """Capacity of one pod at the configured GPU share."""
        cap = self.tokens_per_s_per_pod
        if isinstance(cap, CapacityModel):
            value = cap.tokens_per_s(self.gpu_share)
        elif callable(cap):
            value = cap(self.gpu_share)
        else:
            value = float(cap)
        if not value > 0:
            raise ValueError(f"{self.stage}: pod capacity must be positive, got {value}")
        return value

    def resolved_rate_source(self) -> str:
        """Which arrival rate loads this stage: prefill eats prompt tokens, decode makes output."""
        if self.rate_source is not None:
            return self.rate_source
        return {"prefill": "prompt", "decode": "output"}.get(self.stage, "total")


@dataclass(frozen=True)
class Decision:
    """The outcome of one decide() call; `needs` are fractional replica counts for the logs."""

    desired: int
    reason: str
    needs: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"desired": self.desired, "reason": self.reason, "needs": dict(self.needs)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Decision:
        needs = {str(k): float(v) for k, v in data.get("needs", {}).items()}
        return Decision(int(data["desired"]), str(data["reason"]), needs)


@dataclass(frozen=True)
class ControllerState:
    """What the loop remembers between decisions; checkpointed in the store as JSON."""

    ema: dict[str, float] = field(default_factory=dict)
    ema_time: dict[str, float] = field(default_factory=dict)
    need_history: tuple[tuple[float, float], ...] = ()  # (time, max need) within the window
    kv_tokens_per_pod: float | None = None  # last seen, for when no pod is ready
    last_scale_up_time: float | None = None
    last_scale_down_time: float | None = None
    last_desired: int | None = None
    last_decision: Decision | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (no inf/NaN: needs and EMAs are finite)."""
        return {
            "ema": dict(self.ema),
            "ema_time": dict(self.ema_time),
            "need_history": [[t, n] for t, n in self.need_history],
            "kv_tokens_per_pod": self.kv_tokens_per_pod,
            "last_scale_up_time": self.last_scale_up_time,
            "last_scale_down_time": self.last_scale_down_time,
            "last_desired": self.last_desired,
            "last_decision": None if self.last_decision is None else self.last_decision.to_dict(),
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ControllerState:
        decision = data.get("last_decision")
        return ControllerState(
            ema={k: float(v) for k, v in data.get("ema", {}).items()},
            ema_time={k: float(v) for k, v in data.get("ema_time", {}).items()},
            need_history=tuple((float(t), float(n)) for t, n in data.get("need_history", [])),
            kv_tokens_per_pod=data.get("kv_tokens_per_pod"),
            last_scale_up_time=data.get("last_scale_up_time"),
            last_scale_down_time=data.get("last_scale_down_time"),
            last_desired=data.get("last_desired"),
            last_decision=None if decision is None else Decision.from_dict(decision),
        )
