"""The gateway's Prometheus metrics. Names, units and labels are defined here only."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5)


class GatewayMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("elastune_gateway_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("elastune_gateway_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.completion_tokens = Counter("elastune_gateway_completion_tokens", "Tokens streamed back", registry=r)
        self.in_flight = Gauge("elastune_gateway_requests_in_flight", "Requests being served", registry=r)
        self.ttft = Histogram("elastune_gateway_ttft_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("elastune_gateway_e2e_seconds", "End-to-end request latency", buckets=LATENCY_BUCKETS, registry=r)
        self.stage_requests = Gauge("elastune_gateway_stage_requests", "Requests waiting for a first token (queued) or streaming (decoding)", ["stage"], registry=r)
        self.queued_prompt_tokens = Gauge("elastune_gateway_queued_prompt_tokens", "Prompt tokens of requests waiting for a first token", registry=r)
        self.workers = Gauge("elastune_gateway_workers", "Live workers seen in the store", ["stage"], registry=r)
        self.itl = Histogram("elastune_gateway_itl_seconds", "Inter-token latency (per token, over each streamed delta)",
                             buckets=ITL_BUCKETS, registry=r)
        self.rejected = Counter("elastune_gateway_rejected", "Requests refused at the door, by reason "
                                "(budget, kv_headroom, too_large, deadline, unauthorized)", ["reason"], registry=r)
        self.fleet_kv_tokens = Gauge("elastune_gateway_fleet_kv_tokens", "Decode fleet KV as reported to the store, "
                                     "in tokens (used, capacity)", ["kind"], registry=r)
