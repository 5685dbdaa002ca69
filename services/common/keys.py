"""Every key elastune writes in the store. One module owns the names."""

from __future__ import annotations

DEFAULT_PREFIX = "elastune"


def worker_report(prefix: str, worker_id: str) -> str:
    """A worker's latest LoadReport (protobuf bytes); expires when heartbeats stop."""
    return f"{prefix}:worker:{worker_id}"


def stage_workers(prefix: str, stage: str) -> str:
    """The set of worker ids that registered for a stage (pruned when their report expires)."""
    return f"{prefix}:workers:{stage}"
