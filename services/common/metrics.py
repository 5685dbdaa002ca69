"""Prometheus metrics every prefill and decode worker exports, read from its load report.

The load report is the worker's one account of its state (the router, the scaler and the
tuner read it too), so the gauges here are computed from it at scrape time rather than kept
up to date by hand in the hot path. Stage-specific counters and histograms live in
services/<stage>/metrics.py. Each worker serves its registry on `metrics_port` (0: off).

All gauges carry the label `stage`; the pod is the scrape target's own label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .load_report import LoadReport

log = structlog.get_logger(__name__)

QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
RUNTIME_SETTINGS = ("max_batch_size", "max_concurrency", "prefill_chunk_size", "local_prefill_threshold")


class LoadReportCollector(Collector):
    """Gauges from `report()` at each scrape. `kv_bytes_per_token` turns KV tokens into bytes."""

    def __init__(self, report: Callable[[], LoadReport], kv_bytes_per_token: Callable[[], int] = lambda: 0):
        self._report = report
        self._kv_bytes_per_token = kv_bytes_per_token

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        r = self._report()
        per_token = self._kv_bytes_per_token()
        values = {
            "elastune_worker_queue_length": r.queue_len,
            "elastune_worker_queued_tokens": r.queued_tokens,
            "elastune_worker_active_sequences": r.running_seqs,
            "elastune_worker_kv_used_bytes": r.kv_used_tokens * per_token,
            "elastune_worker_kv_capacity_bytes": r.kv_capacity_tokens * per_token,
            "elastune_worker_kv_used_tokens": r.kv_used_tokens,
            "elastune_worker_kv_capacity_tokens": r.kv_capacity_tokens,
            "elastune_worker_prompt_tokens_per_second": r.prompt_tokens_per_s,
            "elastune_worker_output_tokens_per_second": r.output_tokens_per_s,
            "elastune_worker_step_p50_seconds": r.step_ms_p50 / 1000,
            "elastune_worker_step_p95_seconds": r.step_ms_p95 / 1000,
            "elastune_worker_gpu_share": r.gpu_share,
            "elastune_worker_draining": float(r.draining),
        }
        for family in self._families():
            if family.name == "elastune_worker_runtime_setting":
                for name in RUNTIME_SETTINGS:
                    family.add_metric([r.stage, name], getattr(r.config, name, 0) if r.config else 0)
            else:
                family.add_metric([r.stage], values[family.name])
            yield family

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        def g(name: str, doc: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["stage", *extra])

        return [
            g("elastune_worker_queue_length", "Requests waiting (prefill: for a micro-batch; decode: for KV space)"),
            g("elastune_worker_queued_tokens", "Prompt tokens of the waiting requests"),
            g("elastune_worker_active_sequences", "Sequences being served (decode: holding KV; prefill: in flight)"),
            g("elastune_worker_kv_used_bytes", "KV cache bytes in use"),
            g("elastune_worker_kv_capacity_bytes", "KV cache bytes the worker may use"),
            g("elastune_worker_kv_used_tokens", "KV cache in use, in tokens"),
            g("elastune_worker_kv_capacity_tokens", "KV cache the worker may use, in tokens"),
            g("elastune_worker_prompt_tokens_per_second", "Prompt tokens taken in per second (5 s window)"),
            g("elastune_worker_output_tokens_per_second", "Tokens generated per second (5 s window)"),
            g("elastune_worker_step_p50_seconds", "Median model step (decode step or prefill micro-batch)"),
            g("elastune_worker_step_p95_seconds", "95th percentile model step"),
            g("elastune_worker_gpu_share", "Fraction of a GPU (MPS/MIG) or of the CPU this worker has"),
            g("elastune_worker_draining", "1 while the worker drains"),
            g("elastune_worker_runtime_setting", "Current runtime settings (the tuner's knobs)", ("setting",)),
        ]


class MetricsServer:
    """/metrics over HTTP from a background thread; port 0: off."""

    def __init__(self) -> None:
        self._http: WSGIServer | None = None

    def serve(self, registry: CollectorRegistry, host: str, port: int) -> None:
        if port:
            self._http, _ = start_http_server(port, addr=host, registry=registry)
            log.info("metrics.started", port=port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
