"""The tuning table: measured throughput and latency per (model, stage, device, share, config).

Profiling (`elastune profile`) fills it; tuners add online observations; the scaler reads
per-pod capacity from it. In the store it is one hash at keys.tuning_table(prefix) with fields
`version` (an integer, +1 per change) and `table` (to_json()). save() is a compare-and-set on
the version: it never replaces a newer table, so a stale tuner cannot undo another's work.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis

from ..common import keys

STAGES = ("prefill", "decode", "experts")
SOURCES = ("profile", "online")
_EPS = 1e-9

Key = tuple[str, str, str, float]

# KEYS[1]: the hash; ARGV: our version, our JSON. Stores when the stored version is older (or the
# stored table is the same one); returns 1 when stored, 0 when a newer or different table is there.
_SAVE_IF_NEWER = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '-1')
local ours = tonumber(ARGV[1])
if current >= ours and redis.call('HGET', KEYS[1], 'table') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'table', ARGV[2])
return 1
"""


@dataclass(frozen=True)
class ProfilePoint:
    """One runtime config measured at one GPU share. Latencies are per output token for decode."""

    model: str
    stage: str
    device: str  # "cpu", "H100", ...
    share: float  # MPS active-thread fraction, MIG fraction or CPU fraction, in (0, 1]
    config: dict[str, int]  # max_batch_size, max_concurrency, prefill_chunk_size
    throughput_tokens_per_s: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    samples: int = 1
    source: str = "profile"
    updated_at: float = 0.0

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {self.share}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")

    @property
    def key(self) -> Key:
        return (self.model, self.stage, self.device, self.share)

    @property
    def batch(self) -> int:
        return int(self.config.get("max_batch_size", 1))

    def config_key(self) -> tuple[tuple[str, int], ...]:
        return tuple(sorted(self.config.items()))

    def meets(self, slo_p95_ms: float) -> bool:
        return self.latency_p95_ms is not None and self.latency_p95_ms <= slo_p95_ms


def _weighted(a: float | None, wa: int, b: float | None, wb: int) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return (a * wa + b * wb) / (wa + wb)


def merge(old: ProfilePoint, new: ProfilePoint) -> ProfilePoint:
    """Fold `new` into `old` (same key and config).

    A profile point replaces what was there (a fresh, controlled measurement). An online
    observation is averaged in, each figure weighted by its sample count (for p50/p95 this is an
    approximation of the merged quantile); a figure one side lacks (None) keeps the other's value.
    The result counts both sides' samples, keeps the older side's source ("profile" stays
    "profile") and the later updated_at.
    """
    if new.source == "profile":
        return new
    wa, wb = old.samples, new.samples
    return replace(
        old,
        throughput_tokens_per_s=_weighted(old.throughput_tokens_per_s, wa, new.throughput_tokens_per_s, wb) or 0.0,
        latency_p50_ms=_weighted(old.latency_p50_ms, wa, new.latency_p50_ms, wb),
        latency_p95_ms=_weighted(old.latency_p95_ms, wa, new.latency_p95_ms, wb),
        samples=wa + wb,
        updated_at=max(old.updated_at, new.updated_at),
    )


def best_within_slo(points: Sequence[ProfilePoint], slo_p95_ms: float) -> ProfilePoint | None:
    """The highest-throughput point whose p95 meets the SLO (ties: the smaller batch)."""
    meeting = [p for p in points if p.meets(slo_p95_ms)]
    if not meeting:
        return None
    return max(meeting, key=lambda p: (p.throughput_tokens_per_s, -p.batch))


@dataclass
class TuningTable:
    version: int = 0
    _points: dict[Key, list[ProfilePoint]] = field(default_factory=dict)

    def add(self, point: ProfilePoint) -> None:
        rows = self._points.setdefault(point.key, [])
        for i, old in enumerate(rows):
            if old.config_key() == point.config_key():
                rows[i] = merge(old, point)
                break
        else:
            rows.append(point)
        self.version += 1

    def points(self, model: str, stage: str, device: str, share: float) -> list[ProfilePoint]:
        for key, rows in self._points.items():
            if key[:3] == (model, stage, device) and abs(key[3] - share) < _EPS:
                return list(rows)
        return []

    def shares(self, model: str, stage: str, device: str) -> list[float]:
        return sorted(k[3] for k, rows in self._points.items() if k[:3] == (model, stage, device) and rows)

    def nearest_share(self, model: str, stage: str, device: str, share: float) -> float | None:
        """The largest profiled share <= `share`, else the smallest profiled one (None: none)."""
        shares = self.shares(model, stage, device)
        if not shares:
            return None
        below = [s for s in shares if s <= share + _EPS]
        return below[-1] if below else shares[0]

    def capacity_tokens_per_s(self, model: str, stage: str, device: str, share: float, slo_p95_ms: float) -> float | None:
        """Best throughput within the SLO at `share` (what one pod at that share can carry).

        Between two profiled shares: linear interpolation of their capacities, a side with
        nothing within the SLO counting as 0. Below the smallest profiled share: linear from
        (0, 0); above the largest: the largest's capacity. None: nothing meets the SLO nearby.
        """
        shares = self.shares(model, stage, device)

        def cap(s: float) -> float | None:
            best = best_within_slo(self.points(model, stage, device, s), slo_p95_ms)
            return best.throughput_tokens_per_s if best else None

        if not shares:
            return None
        exact = [s for s in shares if abs(s - share) < _EPS]
        if exact:
            return cap(exact[0])
        below = [s for s in shares if s < share]
        above = [s for s in shares if s > share]
        if not above:
            return cap(below[-1])
        hi, c_hi = above[0], cap(above[0])
        lo, c_lo = (below[-1], cap(below[-1])) if below else (0.0, 0.0)
        if c_lo is None and c_hi is None:
            return None
        t = (share - lo) / (hi - lo)
        return (c_lo or 0.0) + t * ((c_hi or 0.0) - (c_lo or 0.0))

    def to_json(self) -> str:
        rows = [asdict(p) for key in sorted(self._points) for p in sorted(self._points[key], key=ProfilePoint.config_key)]
        return json.dumps({"version": self.version, "points": rows}, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str | bytes) -> TuningTable:
        data: dict[str, Any] = json.loads(text)
        table = TuningTable()
        for row in data["points"]:
            point = ProfilePoint(**row)
            table._points.setdefault(point.key, []).append(point)
        table.version = int(data["version"])
        return table

    async def save(self, store: aioredis.Redis, prefix: str) -> bool:
        """Store this table unless a newer (or a different, same-version) one is there."""
        script = store.register_script(_SAVE_IF_NEWER)
        return bool(await script(keys=[keys.tuning_table(prefix)], args=[self.version, self.to_json()]))

    @staticmethod
    async def load(store: aioredis.Redis, prefix: str) -> TuningTable:
        """The stored table, or an empty one (version 0) when none was saved."""
        raw = await store.hget(keys.tuning_table(prefix), "table")
        return TuningTable.from_json(raw) if raw else TuningTable()
