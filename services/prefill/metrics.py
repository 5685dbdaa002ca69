"""The prefill worker's Prometheus metrics. Names, units and labels are defined here only.

Queue, in-flight and step gauges come from the load report: services/common/metrics.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram

from ..common.metrics import QUEUE_BUCKETS, LoadReportCollector, MetricsServer

if TYPE_CHECKING:
    from .server import PrefillWorker


class PrefillMetrics:
    def __init__(self, worker: "PrefillWorker"):
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("elastune_prefill_prompt_tokens", "Prompt tokens accepted", registry=r)
        self.requests = Counter("elastune_prefill_requests", "Prefill calls by outcome (admitted, overloaded, invalid)",
                                ["outcome"], registry=r)
        self.queue_wait = Histogram("elastune_prefill_queue_wait_seconds", "Wait for a micro-batch",
                                    buckets=QUEUE_BUCKETS, registry=r)
        self.compute = Histogram("elastune_prefill_compute_seconds", "Forward pass of the micro-batch a prompt was in",
                                 buckets=QUEUE_BUCKETS, registry=r)
        r.register(LoadReportCollector(worker.load_report))
        self.http = MetricsServer()
