"""The tuner sidecar's Prometheus metrics. Names, units and labels are defined here only."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class TunerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.config_changes = Counter(
            "elastune_tuner_config_changes_total", "Runtime configs applied to the worker, by the reason for each",
            ["stage", "reason"], registry=r,
        )
        self.rejected = Counter(
            "elastune_tuner_config_rejected_total", "Configs the worker refused (INVALID_ARGUMENT)", ["stage"], registry=r,
        )
        self.observations = Counter(
            "elastune_tuner_online_observations_total", "Online observations written to the tuning table", ["stage"],
            registry=r,
        )
        self.share = Gauge("elastune_tuner_share", "The pod's share of its device, as the tuner sees it", ["stage"],
                           registry=r)
        self.max_batch_size = Gauge("elastune_tuner_max_batch_size", "max_batch_size last applied", ["stage"],
                                    registry=r)
