"""KEDA external scaler configuration (environment: ELASTUNE_<FIELD>, see services/common/config.py).

These are process settings. What to scale and how (stage, mode, policy parameters) comes
with each call, in the ScaledObject's trigger metadata: see services/scaler/metadata.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScalerConfig:
    host: str = "127.0.0.1"  # address the gRPC server binds ("0.0.0.0" in a pod)
    port: int = 9090  # the port in KEDA's `scalerAddress` (k8s/ uses 9090); 0: any free port
    store_url: str = ""  # redis:// URL of the shared store (REDIS_URL); required
    store_prefix: str = "elastune"  # default key prefix; a trigger's `storePrefix` overrides it
    metrics_port: int = 0  # Prometheus /metrics over HTTP; 0: off
    metrics_host: str = "0.0.0.0"  # address the metrics HTTP server binds
    decision_interval_s: float = 5.0  # default `decisionIntervalSeconds` of a trigger
    signal_max_age_s: float = 0.5  # reads of one stage's reports this close together share one store read
    stream_poll_s: float = 0.25  # StreamIsActive: how often the signals are re-read
    stream_repeat_s: float = 5.0  # StreamIsActive: an unchanged value is re-sent at most this often
    checkpoint_ttl_s: float = 7 * 24 * 3600.0  # a ScaledObject's state outlives this much silence
    drain_grace_s: float = 5.0  # SIGTERM: how long open streams get to end
    # TLS for KEDA (see services/scaler/tls.py): PEM files, e.g. from a mounted Secret.
    tls_cert_file: str = ""  # the scaler's certificate chain; with tls_key_file, serve TLS
    tls_key_file: str = ""
    tls_client_ca_file: str = ""  # CA that signs KEDA's client certificate: require it (mutual TLS)

    def validate(self) -> None:
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in 0..65535, got {getattr(self, name)}")
        for name in ("decision_interval_s", "stream_poll_s", "stream_repeat_s", "checkpoint_ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("drain_grace_s", "signal_max_age_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.store_prefix:
            raise ValueError("store_prefix must not be empty")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
