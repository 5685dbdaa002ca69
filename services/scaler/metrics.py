"""The scaler's Prometheus metrics. Names, units and labels are defined here only.

`scaled_object` is "<namespace>/<name>". Gauges are set by whichever replica answered last
(from a fresh or a stored decision); the decision counter counts each decision once, on the
replica that took it.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from .checkpoint import DecisionRecord

log = structlog.get_logger(__name__)


class ScalerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        labels = ["stage", "scaled_object"]
        self.desired = Gauge(
            "elastune_scaler_desired_replicas", "Replicas the policy wants (in raw mode: its advice)", labels, registry=r
        )
        self.current = Gauge(
            "elastune_scaler_current_replicas", "Ready (reporting, not draining) replicas at the last decision",
            labels, registry=r,
        )
        self.pending = Gauge(
            "elastune_scaler_pending_replicas", "Replicas asked for but not reporting at the last decision",
            labels, registry=r,
        )
        self.metric_value = Gauge(
            "elastune_scaler_metric_value", "The value last returned to KEDA (replicas or tokens/s)", labels, registry=r
        )
        self.reason = Gauge(
            "elastune_scaler_decision_reason", "1 for the reason of the last decision answered (0 for earlier ones)",
            ["stage", "scaled_object", "reason"], registry=r,
        )
        self._last_reason: dict[tuple[str, str], str] = {}
        self.decisions = Counter(
            "elastune_scaler_decisions_total", "Decisions taken, by the reason each one gave", ["stage", "reason"],
            registry=r,
        )
        self.conflicts = Counter(
            "elastune_scaler_decision_conflicts_total", "Decisions discarded because another replica's won the race",
            ["stage"], registry=r,
        )
        self._http: WSGIServer | None = None

    def observe(self, stage: str, scaled_object: str, record: DecisionRecord) -> None:
        """The answer given to KEDA for one ScaledObject."""
        self.desired.labels(stage, scaled_object).set(record.decision.desired)
        self.current.labels(stage, scaled_object).set(record.ready_replicas)
        self.pending.labels(stage, scaled_object).set(record.pending_replicas)
        self.metric_value.labels(stage, scaled_object).set(record.value)
        reason, before = record.decision.reason, self._last_reason.get((stage, scaled_object))
        if before is not None and before != reason:
            self.reason.labels(stage, scaled_object, before).set(0)
        self.reason.labels(stage, scaled_object, reason).set(1)
        self._last_reason[(stage, scaled_object)] = reason

    def decided(self, stage: str, reason: str) -> None:
        self.decisions.labels(stage, reason).inc()

    def lost_race(self, stage: str) -> None:
        self.conflicts.labels(stage).inc()

    def serve(self, host: str, port: int) -> None:
        """Serve /metrics over HTTP from a background thread (port 0: off)."""
        if port:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
            log.info("scaler.metrics_started", port=port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
