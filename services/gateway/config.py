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

    def validate(self) -> None:
        for name in ("http_port", "grpc_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in 0..65535, got {getattr(self, name)}")
        if self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        if self.default_timeout_s <= 0:
            raise ValueError(f"default_timeout_s must be > 0, got {self.default_timeout_s}")
