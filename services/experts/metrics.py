"""The experts service's Prometheus metrics. Names, units and labels are defined here only.

`group` is the expert group a replica serves (its Deployment and ScaledObject); `expert`
the expert index within the model; `layer` the MoE layer. Per-expert token counts show the
routing skew that decides which group to replicate.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..common.metrics import QUEUE_BUCKETS, MetricsServer


class ExpertsMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tokens = Counter("elastune_experts_tokens", "Tokens routed to an expert", ["group", "expert"], registry=r)
        self.requests = Counter("elastune_experts_forward_requests", "Experts.Forward calls", ["group"], registry=r)
        self.forward = Histogram("elastune_experts_forward_seconds", "Experts.Forward service time", ["group"],
                                 buckets=QUEUE_BUCKETS, registry=r)
        self.micro_batches = Counter("elastune_experts_micro_batches",
                                     "Expert micro-batches computed (pieces of calls)", ["group"], registry=r)
        self.batch_tokens = Histogram("elastune_experts_batch_tokens", "Tokens per Experts.Forward call", ["group"],
                                      buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384), registry=r)
        self.in_flight = Gauge("elastune_experts_in_flight", "Experts.Forward calls being served", ["group"],
                               registry=r)
        self.placement_version = Gauge("elastune_experts_placement_version", "Version of the expert placement in use",
                                       registry=r)
        self.http = MetricsServer()

    def routed(self, group: str, tokens_per_expert: dict[int, int]) -> None:
        for expert, n in tokens_per_expert.items():
            if n:
                self.tokens.labels(group, str(expert)).inc(n)
