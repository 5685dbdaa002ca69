"""Scaling events of the local autoscaler: kept in memory, printed one per line, optionally appended as JSON lines."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Why the replicas changed: one place for every reason string.
REASON_ACTIVATION = "activation"  # KEDA's executor raised the target: from zero/idle, or up to minReplicaCount
REASON_COOLDOWN = "cooldown"  # KEDA's executor: inactive for cooldownPeriod, down to idle/minReplicaCount
REASON_HPA = "hpa"  # the HPA algorithm on the scaler's metrics
REASON_FALLBACK = "fallback"  # the HPA, with at least one failing metric replaced by fallback replicas
REASONS = (REASON_ACTIVATION, REASON_COOLDOWN, REASON_HPA, REASON_FALLBACK)


def print_line(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class ScalingEvent:
    time: float  # the autoscaler's clock (s)
    scaled_object: str
    stage: str
    from_replicas: int
    to_replicas: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "scaled_object": self.scaled_object,
            "stage": self.stage,
            "from": self.from_replicas,
            "to": self.to_replicas,
            "reason": self.reason,
        }

    def line(self) -> str:
        return (
            f"autoscaler: {self.scaled_object} ({self.stage}) "
            f"{self.from_replicas} -> {self.to_replicas} replicas [{self.reason}]"
        )


class EventLog:
    """Every event in `events`; `echo` (stdout by default) gets one line each; `path` gets JSON lines."""

    def __init__(self, path: str | Path | None = None, echo: Callable[[str], None] | None = print_line):
        self.path = Path(path) if path else None
        self.echo = echo
        self.events: list[ScalingEvent] = []

    def record(self, event: ScalingEvent) -> None:
        if event.reason not in REASONS:
            raise ValueError(f"unknown scaling reason {event.reason!r}; known: {REASONS}")
        self.events.append(event)
        if self.echo is not None:
            self.echo(event.line())
        if self.path is not None:
            # One short line per scaling event (seconds apart at most): cheap enough for the event loop.
            with self.path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(event.to_dict()) + "\n")
