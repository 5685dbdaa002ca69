"""The decode worker's Prometheus metrics. Names, units and labels are defined here only.

Gauges shared with prefill (queue, active sequences, KV bytes, step times, runtime settings)
come from the load report: services/common/metrics.py. Preemptions and prefix-cache evictions
are read at scrape time from the engine's scheduler and block manager, so the hot loop needs
no Prometheus calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..common.metrics import QUEUE_BUCKETS, LoadReportCollector, MetricsServer

if TYPE_CHECKING:
    from .server import DecodeWorker


class _EngineCollector(Collector):
    def __init__(self, worker: "DecodeWorker"):
        self.worker = worker

    def describe(self) -> Iterator[Metric]:
        return iter(self._families(0, 0, 0, 0.0))

    def collect(self) -> Iterator[Metric]:
        engine = self.worker.engine
        recomputed = swapped = evicted = 0
        fill = 0.0
        if engine is not None:
            s = engine.scheduler
            recomputed, swapped, evicted = s.recomputes, s.swaps_out, engine.kv.evictions
            max_batch = max(self.worker.runtime.max_batch_size, 1)
            fill = min(engine.slots.used, max_batch) / max_batch
        return iter(self._families(recomputed, swapped, evicted, fill))

    @staticmethod
    def _families(recomputed: int, swapped: int, evicted: int, fill: float) -> list[Metric]:
        # one name, a mode label: sum() over it is the total that dashboards already query
        p = CounterMetricFamily("elastune_decode_preemptions", "Sequences preempted for KV space, by mode "
                                "(recompute: KV dropped, computed again; swap: KV copied to host memory and back)",
                                labels=["mode"])
        p.add_metric(["recompute"], recomputed)
        p.add_metric(["swap"], swapped)
        e = CounterMetricFamily("elastune_decode_kv_evictions", "Cached prefix KV blocks evicted")
        e.add_metric([], evicted)
        f = GaugeMetricFamily("elastune_decode_batch_fill_ratio", "Sequences per decode step / max_batch_size")
        f.add_metric([], fill)
        return [p, e, f]


class DecodeMetrics:
    def __init__(self, worker: "DecodeWorker"):
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("elastune_decode_prompt_tokens", "Prompt tokens of requests admitted", registry=r)
        self.tokens_out = Counter("elastune_decode_output_tokens", "Tokens streamed to the gateway", registry=r)
        self.requests = Counter("elastune_decode_requests", "Generate calls by outcome "
                                "(admitted, overloaded, timeout, invalid)", ["outcome"], registry=r)
        self.queue_wait = Histogram("elastune_decode_queue_wait_seconds", "Wait for KV space before prefill",
                                    buckets=QUEUE_BUCKETS, registry=r)
        self.kv_transfer = Histogram("elastune_decode_kv_transfer_seconds", "First KV byte to KV adopted",
                                     buckets=QUEUE_BUCKETS, registry=r)
        r.register(LoadReportCollector(worker.load_report, lambda: _kv_bytes_per_token(worker)))
        r.register(_EngineCollector(worker))
        self.http = MetricsServer()


def _kv_bytes_per_token(worker: "DecodeWorker") -> int:
    runner = worker.runner
    return 0 if runner is None else runner.config.kv_bytes_per_token(runner.dtype.itemsize)
