"""Prefill worker configuration (environment: ELASTUNE_<FIELD>, see services/common/config.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..common.config import WorkerConfig


@dataclass(frozen=True)
class PrefillConfig(WorkerConfig):
    max_batch_size: int = 8  # prompts per micro-batch
    max_batch_tokens: int = 8192  # padded tokens per micro-batch (batch x longest prompt)
    max_queue: int = 256  # queued prompts beyond which new ones get RESOURCE_EXHAUSTED

    def validate(self) -> None:
        super().validate()
        for name in ("max_batch_size", "max_batch_tokens", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
