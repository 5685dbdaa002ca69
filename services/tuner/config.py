"""Tuner sidecar configuration (environment: ELASTUNE_<FIELD>, see services/common/config.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TunerConfig:
    worker: str = ""  # host:port of the worker whose Admin service this sidecar drives
    store_url: str = ""  # redis:// URL of the shared store (REDIS_URL); holds the tuning table
    store_prefix: str = "elastune"
    interval_s: float = 1.0  # one decision per interval
    slo_prefill_ms: float = 500.0  # p95 of one prefill micro-batch (the compute part of TTFT)
    slo_decode_ms: float = 100.0  # p95 of one decode step (the inter-token latency)
    # p95 of one expert micro-batch (the device time a routed call can wait behind); 0: slo_decode_ms,
    # as the scaler does (every decode step waits for its experts calls).
    slo_experts_ms: float = 0.0
    hysteresis: float = 0.05  # keep the current config unless the best beats it by this fraction
    min_dwell_s: float = 5.0  # no config change sooner than this after the last (share changes excepted)
    settle_s: float = 5.0  # a config must run this long before its step timings count as its own
    observe_interval_s: float = 10.0  # at most one online observation per interval into the table
    explore_interval_s: float = 120.0  # at most one exploration per interval; 0: never explore
    explore_s: float = 10.0  # how long an exploration runs
    explore_margin: float = 0.15  # explore configs whose table throughput is within this of the best
    backlog_drain_s: float = 10.0  # queued tokens count as load spread over this long
    device_kind: str = ""  # the table's device key; empty: "cpu" for a CPU worker, else the table's GPU
    share: float = 0.0  # the pod's share; 0: detect (MPS %, MIG profile, the worker's report)
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 0  # Prometheus /metrics over HTTP; 0: off

    def validate(self) -> None:
        if not self.worker:
            raise ValueError("worker must be the worker's host:port (ELASTUNE_WORKER or --worker)")
        for name in ("interval_s", "slo_prefill_ms", "slo_decode_ms", "backlog_drain_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("slo_experts_ms", "hysteresis", "min_dwell_s", "settle_s", "observe_interval_s",
                     "explore_interval_s", "explore_s", "explore_margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.share <= 1:
            raise ValueError(f"share must be in (0, 1] (0: detect), got {self.share}")

    def slo_ms(self, stage: str) -> float:
        """The stage's SLO; `stage` is the table's (prefill, decode, experts) or a worker's."""
        if stage == "prefill":
            return self.slo_prefill_ms
        if stage.startswith("experts") and self.slo_experts_ms > 0:
            return self.slo_experts_ms
        return self.slo_decode_ms
