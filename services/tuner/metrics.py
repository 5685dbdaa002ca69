"""The tuner sidecar's Prometheus metrics. Names, units and labels are defined here only.

`stage` is the worker's stage; `setting` one of RuntimeConfig's knobs (max_batch_size,
max_concurrency, prefill_chunk_size, local_prefill_threshold); `reason` why the tuner
changed the config (load, share, slo, explore, ...); `provenance` where a tuning-table
row came from (profile or online).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..common.metrics import MetricsServer


class TunerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.config_changes = Counter("elastune_tuner_config_changes", "Runtime configs applied to the worker",
                                      ["stage", "reason"], registry=r)
        self.setting = Gauge("elastune_tuner_setting", "The runtime setting the tuner last applied",
                             ["stage", "setting"], registry=r)
        self.rejected = Counter("elastune_tuner_config_rejected", "Configs the worker refused (INVALID_ARGUMENT)",
                                ["stage"], registry=r)
        self.apply_failures = Counter("elastune_tuner_apply_failures", "Admin.SetConfig calls that failed otherwise",
                                      ["stage"], registry=r)
        self.share = Gauge("elastune_tuner_share", "The pod's GPU (or CPU) share the tuner tunes for", ["stage"],
                           registry=r)
        self.table_updates = Counter("elastune_tuner_table_updates", "Tuning-table entries written, by provenance",
                                     ["stage", "provenance"], registry=r)
        self.http = MetricsServer()

    def applied(self, stage: str, reason: str, settings: dict[str, int]) -> None:
        self.config_changes.labels(stage, reason).inc()
        for name, value in settings.items():
            self.setting.labels(stage, name).set(value)
