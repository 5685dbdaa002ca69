"""Runtime settings a worker applies at a batch boundary (the tuner's knobs)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..proto import inference_pb2 as pb


@dataclass(frozen=True)
class RuntimeConfig:
    max_batch_size: int
    max_concurrency: int
    prefill_chunk_size: int = 0  # 0: whole prompt in one pass
    local_prefill_threshold: int = 0  # prompts shorter than this are prefilled by decode itself
    version: int = 0

    def validate(self, slots: int | None = None) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if slots is not None and self.max_concurrency > slots:
            raise ValueError(f"max_concurrency must be <= {slots} (KV slots), got {self.max_concurrency}")

    def updated(self, change: pb.RuntimeConfig) -> "RuntimeConfig":
        """Apply a SetConfig message: 0 fields stay unchanged; the version goes up by one."""
        fields = ("max_batch_size", "max_concurrency", "prefill_chunk_size", "local_prefill_threshold")
        changes = {f: getattr(change, f) for f in fields if getattr(change, f)}
        return replace(self, **changes, version=self.version + 1)

    def to_proto(self) -> pb.RuntimeConfig:
        return pb.RuntimeConfig(
            max_batch_size=self.max_batch_size,
            max_concurrency=self.max_concurrency,
            prefill_chunk_size=self.prefill_chunk_size,
            local_prefill_threshold=self.local_prefill_threshold,
            version=self.version,
        )

    @classmethod
    def from_proto(cls, msg: pb.RuntimeConfig) -> "RuntimeConfig":
        return cls(msg.max_batch_size, msg.max_concurrency, msg.prefill_chunk_size, msg.local_prefill_threshold, msg.version)
