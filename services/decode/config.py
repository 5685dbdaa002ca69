"""Decode worker configuration (environment: ELASTUNE_<FIELD>, see services/common/config.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..common.config import WorkerConfig


@dataclass(frozen=True)
class DecodeConfig(WorkerConfig):
    kv_slots: int = 64  # most sequences admitted at once (seats); their KV lives in paged blocks
    max_concurrency: int = 64  # sequences admitted at once (<= kv_slots); the tuner may lower it
    kv_cache_bytes: int = 0  # KV block pool budget on CPU; 0: kv_slots full contexts' worth
    kv_gpu_fraction: float = 0.9  # on CUDA the pool takes this fraction of the memory free after loading
    kv_block_size: int = 16  # tokens per KV block
    step_token_budget: int = 512  # most tokens one engine step computes (decode rows + prompt chunks)
    max_batch_size: int = 64  # sequences per decode step; more running ones take turns
    max_waiting: int = 256  # requests waiting for a slot beyond which new ones get RESOURCE_EXHAUSTED
    local_prefill_threshold: int = 0  # prompts shorter than this are prefilled here, not remotely
    migrate_on_drain: bool = True  # SIGTERM / Admin.Drain: hand running sequences to peers
    adopt_timeout_s: float = 30.0  # an adopted sequence nobody resumes within this is aborted
    swap_space_bytes: int = 0  # host memory for swapped-out KV (pinned beside a GPU); 0: preemption always recomputes
    swap_min_tokens: int = 64  # a preempted sequence with fewer computed tokens is recomputed, not swapped
    decode_mirror: bool = True  # CPU: keep decode rows' gathered KV across steps (faster; up to the batch's KV again in RAM)
    prefill_stall_timeout_s: float = 30.0  # a prefill call silent this long is dropped; the prompt is computed here
    # auto: CUDA IPC on the same GPU, shared memory on this host, else kv_cross_host;
    # tcp / grpc: always that path (tests, benchmarks, or hosts whose /dev/shm is not shared)
    kv_transport: str = "auto"
    kv_cross_host: str = "tcp"  # prompt KV from another host: tcp (a plain socket, kv_tcp.py) or grpc (bytes in the stream)
    kv_tcp_port: int = 0  # the KV socket's port on `host` (advertised like the gRPC one); 0: any free port
    kv_tcp_timeout_s: float = 30.0  # a tcp KV transfer silent this long fails (the prompt is then computed here)

    def validate(self) -> None:
        super().validate()
        for name in ("kv_slots", "max_concurrency", "max_batch_size", "max_waiting", "kv_block_size", "step_token_budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_concurrency > self.kv_slots:
            raise ValueError(f"max_concurrency ({self.max_concurrency}) must be <= kv_slots ({self.kv_slots})")
        if self.swap_space_bytes < 0 or self.swap_min_tokens < 1:
            raise ValueError(f"swap_space_bytes must be >= 0 and swap_min_tokens >= 1, got {self.swap_space_bytes} "
                             f"and {self.swap_min_tokens}")
        if self.kv_cache_bytes < 0 or not 0 < self.kv_gpu_fraction <= 1:
            raise ValueError("kv_cache_bytes must be >= 0 and kv_gpu_fraction in (0, 1]")
        if self.prefill_stall_timeout_s <= 0:
            raise ValueError(f"prefill_stall_timeout_s must be > 0, got {self.prefill_stall_timeout_s}")
        if self.kv_transport not in ("auto", "tcp", "grpc"):
            raise ValueError(f"kv_transport must be auto, tcp or grpc, got {self.kv_transport!r}")
        if self.kv_cross_host not in ("tcp", "grpc"):
            raise ValueError(f"kv_cross_host must be tcp or grpc, got {self.kv_cross_host!r}")
        if not 0 <= self.kv_tcp_port < 65536:
            raise ValueError(f"kv_tcp_port must be in 0..65535, got {self.kv_tcp_port}")
        if self.kv_tcp_timeout_s <= 0:
            raise ValueError(f"kv_tcp_timeout_s must be > 0, got {self.kv_tcp_timeout_s}")

    @property
    def offers_tcp(self) -> bool:
        """Whether prefill workers may be asked to send KV over the tcp path."""
        return self.kv_transport == "tcp" or (self.kv_transport == "auto" and self.kv_cross_host == "tcp")
