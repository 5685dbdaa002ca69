"""Service configuration: one dataclass per service, filled from the environment in one place.

Every field `name` of a service's config dataclass can be set by the environment variable
`ELASTUNE_<NAME>` (upper case), e.g. ELASTUNE_MAX_BATCH_SIZE=16; `store_url` also reads
REDIS_URL. Command-line flags override the environment. Each dataclass documents its fields.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar, get_type_hints

T = TypeVar("T")

ENV_PREFIX = "ELASTUNE_"
ENV_ALIASES = {"store_url": "REDIS_URL"}


def _coerce(name: str, raw: str, kind: Any) -> Any:
    text = str(kind)
    try:
        if kind is bool or text == "bool":
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if kind is int or text == "int":
            return int(raw)
        if kind is float or text == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {ENV_PREFIX}{name.upper()}={raw!r} is not a valid {text}") from None
    return raw


def from_env(cls: type[T], env: dict[str, str] | None = None, **overrides: Any) -> T:
    """Build a config dataclass from defaults, then the environment, then explicit overrides."""
    env = os.environ if env is None else env
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):
        for var in (ENV_PREFIX + f.name.upper(), ENV_ALIASES.get(f.name)):
            if var and env.get(var):
                values[f.name] = _coerce(f.name, env[var], hints[f.name])
                break
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def _worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class WorkerConfig:
    """Fields every prefill and decode worker has."""

    model_dir: str = ""  # Hugging Face model directory; empty: the tiny default model
    host: str = "127.0.0.1"  # address the gRPC server binds
    port: int = 0  # 0: any free port
    advertise_host: str = ""  # address other services dial; empty: `host` (or the hostname for 0.0.0.0)
    store_url: str = ""  # redis:// URL of the shared store (REDIS_URL)
    store_prefix: str = "elastune"  # key prefix, so several deployments can share one store
    worker_id: str = field(default_factory=_worker_id)
    device: str = "cpu"  # "cpu" or "cuda[:N]"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    threads: int = 0  # torch CPU threads; 0: torch's default
    report_interval_s: float = 1.0  # load-report period
    heartbeat_ttl_s: float = 3.0  # a worker silent this long leaves routing
    drain_grace_s: float = 30.0  # SIGTERM: how long running work may take to finish
    gpu_share: float = 1.0  # fraction of a GPU (MPS/MIG) or of the CPU this worker has
    experts: str = "local"  # MoE models: local (experts in this worker) or remote (the experts service)
    metrics_port: int = 0  # Prometheus /metrics over HTTP on `host`; 0: off

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.heartbeat_ttl_s <= self.report_interval_s:
            raise ValueError("heartbeat_ttl_s must exceed report_interval_s")
        if not 0 < self.gpu_share <= 1:
            raise ValueError(f"gpu_share must be in (0, 1], got {self.gpu_share}")
        if self.experts not in ("local", "remote"):
            raise ValueError(f"experts must be local or remote, got {self.experts!r}")

    def advertised(self, port: int) -> str:
        host = self.advertise_host or (socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host)
        return f"{host}:{port}"

