"""Experts server configuration (environment: ELASTUNE_<FIELD>, see services/common/config.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..common.config import WorkerConfig
from .placement import GROUP_NAME


@dataclass(frozen=True)
class ExpertsConfig(WorkerConfig):
    expert_group: str = "g0"  # the expert group this server serves (its Deployment); registers as stage experts/<group>
    num_groups: int = 1  # groups of the initial even placement, written if the store has none
    max_tokens_per_call: int = 65536  # rows of one Forward call; more is INVALID_ARGUMENT
    # The initial expert micro-batch (runtime max_batch_size, which the tuner sidecar changes):
    # the most routed tokens one expert pass computes; larger calls are cut (micro_batch.py).
    # 0: max_tokens_per_call.
    micro_batch_tokens: int = 0
    # Synthetic experts (no MoE checkpoint): this many seeded random FFNs of the sizes below, for
    # a dense model's extra expert workload (services/experts/synthetic.py). 0: read model_dir.
    synthetic_experts: int = 0
    synthetic_hidden_size: int = 192
    synthetic_intermediate_size: int = 256
    # Benchmarks only: hold each call this long per routed (token, expert) pair, as a device of
    # that speed would, so that several replicas on a machine with few cores behave like
    # separate devices. 0: off (the FFNs themselves are always computed).
    service_us_per_token: float = 0.0

    def validate(self) -> None:
        super().validate()
        if not GROUP_NAME.fullmatch(self.expert_group):
            raise ValueError(f"expert_group {self.expert_group!r} is invalid: want lowercase letters, digits and '-', 1-40 long")
        if self.num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {self.num_groups}")
        if self.max_tokens_per_call < 1:
            raise ValueError(f"max_tokens_per_call must be >= 1, got {self.max_tokens_per_call}")
        if self.micro_batch_tokens < 0:
            raise ValueError(f"micro_batch_tokens must be >= 0 (0: max_tokens_per_call), got {self.micro_batch_tokens}")
        if self.synthetic_experts < 0 or self.service_us_per_token < 0:
            raise ValueError("synthetic_experts and service_us_per_token must be >= 0")


@dataclass(frozen=True)
class ExpertsClientConfig:
    """How a prefill or decode worker with experts=remote reaches the experts service."""

    store_url: str = ""  # where placement and experts servers are found (REDIS_URL)
    store_prefix: str = "elastune"
    refresh_s: float = 0.5  # placement and replica loads are re-read this often
    call_timeout_s: float = 30.0  # one Experts.Forward call
    max_retries: int = 3  # other replicas tried after a replica fails (UNAVAILABLE, deadline)
    min_pairs_per_split: int = 16  # a group's call is split across its replicas down to this many pairs each
    ready_timeout_s: float = 120.0  # at start, wait this long for a server in every group
    # Synthetic expert load for a dense model (services/experts/synthetic.py): at every layer,
    # synthetic_ratio of the tokens are also sent to synthetic_top_k of synthetic_experts experts
    # drawn with Zipf skew synthetic_zipf_s (expert 0 hottest); the results are discarded.
    synthetic_experts: int = 8
    synthetic_top_k: int = 2
    synthetic_ratio: float = 1.0
    synthetic_zipf_s: float = 0.0
    synthetic_seed: int = 0

    def validate(self) -> None:
        if self.refresh_s <= 0 or self.call_timeout_s <= 0 or self.ready_timeout_s < 0:
            raise ValueError("refresh_s and call_timeout_s must be > 0, ready_timeout_s >= 0")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.min_pairs_per_split < 1:
            raise ValueError(f"min_pairs_per_split must be >= 1, got {self.min_pairs_per_split}")
        if not 1 <= self.synthetic_top_k <= self.synthetic_experts:
            raise ValueError(f"synthetic_top_k must be in 1..synthetic_experts ({self.synthetic_experts})")
        if not 0 <= self.synthetic_ratio <= 1 or self.synthetic_zipf_s < 0:
            raise ValueError("synthetic_ratio must be in [0, 1] and synthetic_zipf_s >= 0")
