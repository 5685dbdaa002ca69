"""Each ScaledObject's controller state and last decision, checkpointed in the store.

Scaler replicas are stateless (KEDA dials them round-robin), so everything a decision depends
on lives here: a hash at keys.scaler_checkpoint(prefix, namespace, name, stage) with fields
`version` (an integer, +1 per decision) and `record` (the DecisionRecord as JSON:
ControllerState.to_dict(), the Decision, its time and the metric value it produced).

Protocol, per ScaledObject: a caller loads the record; within `decisionIntervalSeconds` of its
`decided_at` the stored value is the answer. The first caller after that decides from the
stored state and commits with a compare-and-set on `version` (one Lua script, atomic in the
store): when two replicas race, one commit wins, and the loser answers with the winner's record,
so a ScaledObject gets one decision per interval however many replicas serve it. A restarted
scaler loads the same record and continues where the old one stopped. The key expires after
`ttl_s` without a decision (a deleted ScaledObject leaves nothing behind for long).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog

from .signals import ControllerState, Decision

log = structlog.get_logger(__name__)

# KEYS[1]: the hash; ARGV: expected version, new version, record JSON, TTL in ms.
# Returns {1, ""} when the record was stored, {0, stored record or ""} when another won.
_COMPARE_AND_SET = """
local current = redis.call('HGET', KEYS[1], 'version') or '0'
if current ~= ARGV[1] then
  return {0, redis.call('HGET', KEYS[1], 'record') or ''}
end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'record', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, ''}
"""


@dataclass(frozen=True)
class DecisionRecord:
    """One decision for one ScaledObject and the state to take the next one from."""

    version: int
    mode: str  # the trigger mode the value was computed for
    decided_at: float  # unix time
    value: float  # what GetMetrics answers: desired replicas, or the stage load in tokens/s
    decision: Decision  # the policy's decision (in raw mode: its advice, for logs and metrics)
    state: ControllerState
    ready_replicas: int = 0
    pending_replicas: int = 0

    def is_fresh(self, now: float, interval_s: float, mode: str) -> bool:
        """Still the answer: same mode and less than one interval old."""
        return self.mode == mode and now - self.decided_at < interval_s

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": self.version,
                "mode": self.mode,
                "decided_at": self.decided_at,
                "value": self.value,
                "decision": self.decision.to_dict(),
                "state": self.state.to_dict(),
                "ready_replicas": self.ready_replicas,
                "pending_replicas": self.pending_replicas,
            },
            separators=(",", ":"),
        )

    @staticmethod
    def from_json(text: str | bytes) -> DecisionRecord:
        data: dict[str, Any] = json.loads(text)
        return DecisionRecord(
            version=int(data["version"]),
            mode=str(data["mode"]),
            decided_at=float(data["decided_at"]),
            value=float(data["value"]),
            decision=Decision.from_dict(data["decision"]),
            state=ControllerState.from_dict(data["state"]),
            ready_replicas=int(data.get("ready_replicas", 0)),
            pending_replicas=int(data.get("pending_replicas", 0)),
        )


@dataclass(frozen=True)
class Commit:
    record: DecisionRecord  # what is stored now: ours when won, else the winner's
    won: bool


def _parse(key: str, raw: bytes | None) -> DecisionRecord | None:
    if not raw:
        return None
    try:
        return DecisionRecord.from_json(raw)
    except (ValueError, KeyError, TypeError) as exc:  # unreadable: start afresh rather than fail forever
        log.warning("scaler.bad_checkpoint", key=key, error=repr(exc))
        return None


class CheckpointStore:
    """Loads and commits DecisionRecords. Store errors (redis.RedisError, OSError) propagate."""

    def __init__(self, store: aioredis.Redis, ttl_s: float):
        self._store = store
        self._ttl_ms = max(int(ttl_s * 1000), 1)
        self._compare_and_set = store.register_script(_COMPARE_AND_SET)

    async def load(self, key: str) -> tuple[int, DecisionRecord | None]:
        """The stored version (0: none) and record (None: none, or unreadable)."""
        version, raw = await self._store.hmget(key, ["version", "record"])
        return (int(version) if version else 0), _parse(key, raw)

    async def commit(self, key: str, expected_version: int, record: DecisionRecord) -> Commit:
        """Store `record` if the version is still `expected_version`; else return the winner's."""
        if record.version != expected_version + 1:
            raise ValueError(f"record version {record.version} must be expected_version + 1 = {expected_version + 1}")
        won, stored = await self._compare_and_set(
            keys=[key], args=[expected_version, record.version, record.to_json(), self._ttl_ms]
        )
        if won:
            return Commit(record, True)
        return Commit(_parse(key, stored) or record, False)
