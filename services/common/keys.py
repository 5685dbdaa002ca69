"""Every key elastune writes in the store. One module owns the names."""

from __future__ import annotations

DEFAULT_PREFIX = "elastune"


def worker_report(prefix: str, worker_id: str) -> str:
    """A worker's latest LoadReport (protobuf bytes); expires when heartbeats stop."""
    return f"{prefix}:worker:{worker_id}"


def stage_workers(prefix: str, stage: str) -> str:
    """The set of worker ids that registered for a stage (pruned when their report expires)."""
    return f"{prefix}:workers:{stage}"


def asked_replicas(prefix: str, stage: str) -> str:
    """How many replicas of a stage were last asked for (an integer as text), written by the local
    autoscaler when it starts or stops pods; the scaler counts those not reporting yet as pending."""
    return f"{prefix}:asked:{stage}"


def scaler_checkpoint(prefix: str, namespace: str, name: str, stage: str) -> str:
    """One ScaledObject's controller state and last decision (a hash: version, record JSON)."""
    return f"{prefix}:scaler:{namespace}/{name}:{stage}"


def tuning_table(prefix: str) -> str:
    """The tuning table (a hash: version, table JSON), written by profiling and the tuners."""
    return f"{prefix}:tuning:table"


def expert_placement(prefix: str) -> str:
    """The MoE expert placement table (a hash: version, placement JSON); services/experts/placement.py."""
    return f"{prefix}:experts:placement"


def expert_tokens(prefix: str) -> str:
    """Tokens computed per expert since the store started (a hash: expert index -> count), summed
    over layers and replicas by the experts servers; rates over time show the routing skew."""
    return f"{prefix}:experts:tokens"


def key_budget(prefix: str, key_id: str) -> str:
    """One API key's token bucket shared by every gateway (a hash: level, updated); expires once full."""
    return f"{prefix}:budget:{key_id}"
