"""Decode worker configuration (environment: ELASTUNE_<FIELD>, see services/common/config.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..common.config import WorkerConfig


@dataclass(frozen=True)
class DecodeConfig(WorkerConfig):
    kv_slots: int = 64  # sequences whose KV fits in memory at once (each slot holds a full context)
    max_concurrency: int = 64  # sequences admitted at once (<= kv_slots); the tuner may lower it
    max_batch_size: int = 64  # sequences per decode step; more running ones take turns
    max_waiting: int = 256  # requests waiting for a slot beyond which new ones get RESOURCE_EXHAUSTED
    local_prefill_threshold: int = 0  # prompts shorter than this are prefilled here, not remotely
    migrate_on_drain: bool = True  # SIGTERM / Admin.Drain: hand running sequences to peers
    adopt_timeout_s: float = 30.0  # an adopted sequence nobody resumes within this is aborted
    kv_transport: str = "auto"  # auto: shared memory with a prefill worker on this host, else gRPC bytes; grpc: always bytes

    def validate(self) -> None:
        super().validate()
        for name in ("kv_slots", "max_concurrency", "max_batch_size", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_concurrency > self.kv_slots:
            raise ValueError(f"max_concurrency ({self.max_concurrency}) must be <= kv_slots ({self.kv_slots})")
        if self.kv_transport not in ("auto", "grpc"):
            raise ValueError(f"kv_transport must be auto or grpc, got {self.kv_transport!r}")
