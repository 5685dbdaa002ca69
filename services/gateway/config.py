"""Gateway configuration (environment: ELASTUNE_<FIELD>, see services/common/config.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GatewayConfig:
    model_dir: str = ""  # the model the workers serve (for its tokenizer); empty: the tiny default
    model_name: str = ""  # id clients put in "model"; empty: the model directory's name
    host: str = "127.0.0.1"  # HTTP and gRPC bind address
    http_port: int = 8000  # OpenAI-compatible HTTP API; 0: any free port
    grpc_port: int = 0  # gRPC Gateway.Generate; 0: any free port
    store_url: str = ""  # redis:// URL of the shared store (REDIS_URL)
    store_prefix: str = "elastune"
    max_tokens_limit: int = 2048  # upper bound a request may ask for
    default_timeout_s: float = 300.0  # end-to-end limit per request
    report_interval_s: float = 1.0  # how often the gateway publishes its own load report
    heartbeat_ttl_s: float = 3.0
    refresh_s: float = 0.25  # how often the worker directory is re-read from the store
    retries: int = 3  # other workers tried when one fails before the first token
    overload_retry_after_s: float = 1.0  # Retry-After sent with 429 / 503
    cold_start_wait_s: float = 0.0  # with no decode worker, hold requests this long for a scale-from-zero
    max_timeout_s: float = 600.0  # the longest end-to-end timeout a request may ask for (field `timeout`, header X-Request-Timeout)
    max_prompt_tokens: int = 0  # longest prompt accepted; 0: the model's context window
    # Admission (services/gateway/admission.py): reject with 429 / RESOURCE_EXHAUSTED when the
    # fleet's KV cannot hold a request or its first token would come later than the SLO.
    admission: bool = True
    ttft_slo_s: float = 10.0  # estimated wait for a first token beyond which requests are rejected
    kv_reserve_fraction: float = 0.05  # of each decode worker's KV kept back for running sequences
    max_retry_after_s: float = 30.0  # cap on the Retry-After admission advises
    # Per-API-key token budgets (services/gateway/budget.py): prompt + completion tokens per second.
    key_tokens_per_s: float = 0.0  # 0: no budget
    key_burst_tokens: int = 0  # bucket size; 0: 60 s at key_tokens_per_s (at least max_tokens_limit)
    key_budget_shared: bool = False  # one bucket per key for all gateways, in the store (shared_budget.py)
    # Bearer-token auth (services/gateway/auth.py); no key configured: auth off.
    api_keys: str = ""  # comma-separated keys
    api_keys_file: str = ""  # file with one key per line (a mounted Secret)

    def validate(self) -> None:
        for name in ("http_port", "grpc_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in 0..65535, got {getattr(self, name)}")
        if self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        if self.default_timeout_s <= 0:
            raise ValueError(f"default_timeout_s must be > 0, got {self.default_timeout_s}")
        if self.max_timeout_s < self.default_timeout_s:
            raise ValueError(f"max_timeout_s ({self.max_timeout_s}) must be >= default_timeout_s ({self.default_timeout_s})")
        if self.max_prompt_tokens < 0:
            raise ValueError(f"max_prompt_tokens must be >= 0, got {self.max_prompt_tokens}")
        if self.ttft_slo_s <= 0 or self.max_retry_after_s < 1:
            raise ValueError("ttft_slo_s must be > 0 and max_retry_after_s >= 1")
        if not 0 <= self.kv_reserve_fraction < 1:
            raise ValueError(f"kv_reserve_fraction must be in [0, 1), got {self.kv_reserve_fraction}")
        if self.key_tokens_per_s < 0 or self.key_burst_tokens < 0:
            raise ValueError("key_tokens_per_s and key_burst_tokens must be >= 0")

    @property
    def burst_tokens(self) -> int:
        return self.key_burst_tokens or max(int(60 * self.key_tokens_per_s), self.max_tokens_limit)
