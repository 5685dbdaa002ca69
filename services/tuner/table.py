"""The tuning table: measured throughput and latency per (model, stage, device, share, config).

Profiling (`elastune profile`) fills it; tuners add online observations; the scaler reads
per-pod capacity from it. A row is keyed by (model, stage, device kind, share), then by the
runtime config and the workload it was measured under (prompt or context length); it carries
the measured figures and where they came from (`source`: profile or online).

In the store it is one hash at keys.tuning_table(prefix) with fields `version` (an integer, +1
per change) and `table` (to_json()). save() is a compare-and-set on the version: it never
replaces a newer table, so a stale tuner cannot undo another's work; update() is the
read-modify-write tuners use (a WATCH transaction, retried), so concurrent writers all land.
Exported files (`elastune tuning export`) hold the same JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

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


def table_stage(stage: str) -> str:
    """The table's stage for a worker's stage: every expert group ("experts/<group>") runs the
    same expert FFNs, so all of them share the "experts" rows."""
    return stage.split("/", 1)[0]


@dataclass(frozen=True)
class ProfilePoint:
    """One runtime config measured at one GPU share. Latencies: one prefill micro-batch, one
    decode step (per output token), one expert micro-batch; experts throughput is in routed
    tokens ((token, expert) pairs) per second, what an expert group's servers report."""

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
    workload: dict[str, int] = field(default_factory=dict)  # {"prompt_len": n}, {"context_len": n}, {"call_tokens": n}

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

    def row_key(self) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
        """What identifies a row within one share: the config and the workload it ran."""
        return (self.config_key(), tuple(sorted(self.workload.items())))

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
            if old.row_key() == point.row_key():
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
            # Several workloads (prompt/context lengths): the pod must carry the hardest one.
            by_workload: dict[tuple, list[ProfilePoint]] = {}
            for p in self.points(model, stage, device, s):
                by_workload.setdefault(p.row_key()[1], []).append(p)
            bests = [best_within_slo(rows, slo_p95_ms) for rows in by_workload.values()]
            if not bests or any(b is None for b in bests):
                return None
            return min(b.throughput_tokens_per_s for b in bests if b is not None)

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

    def groups(self) -> list[tuple[str, str, str]]:
        """The (model, stage, device) triples the table knows."""
        return sorted({k[:3] for k, rows in self._points.items() if rows})

    def all_points(self) -> list[ProfilePoint]:
        return [p for key in sorted(self._points) for p in self._points[key]]

    def workloads(self, model: str, stage: str, device: str) -> list[dict[str, int]]:
        seen = {p.row_key()[1] for k, rows in self._points.items() if k[:3] == (model, stage, device) for p in rows}
        return [dict(w) for w in sorted(seen)]

    def points_at(
        self, model: str, stage: str, device: str, share: float, workload: dict[str, int] | None = None
    ) -> list[ProfilePoint]:
        """One point per config at `share`, measured there or estimated from the config's
        measurements at other shares (the adaptive profile does not measure every config at
        every share). Estimates: a power law between the two nearest measured shares; above the
        largest, its figures (past the knee, more share buys nothing); below the smallest,
        throughput in proportion to the share and latency in inverse proportion (compute-bound).
        `workload`: only the rows of the profiled workload nearest to it (see nearest_workload).
        """
        rows: dict[tuple, dict[float, ProfilePoint]] = {}
        for key, points in self._points.items():
            if key[:3] == (model, stage, device):
                for p in points:
                    rows.setdefault(p.row_key(), {})[key[3]] = p
        if workload is not None:
            target = nearest_workload([dict(k[1]) for k in rows], workload)
            rows = {k: v for k, v in rows.items() if dict(k[1]) == target}
        return [_estimate(by_share, share) for _, by_share in sorted(rows.items())]

    def to_json(self) -> str:
        rows = [asdict(p) for key in sorted(self._points) for p in sorted(self._points[key], key=ProfilePoint.row_key)]
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

    @staticmethod
    async def update(
        store: aioredis.Redis, prefix: str, points: Sequence[ProfilePoint], attempts: int = 16
    ) -> TuningTable:
        """Add `points` to the stored table atomically (WATCH/MULTI, retried when another writer
        got in between) and return the table as stored."""
        key = keys.tuning_table(prefix)
        async with store.pipeline(transaction=True) as pipe:
            for _ in range(attempts):
                try:
                    await pipe.watch(key)
                    raw = await pipe.hget(key, "table")
                    table = TuningTable.from_json(raw) if raw else TuningTable()
                    for p in points:
                        table.add(p)
                    pipe.multi()
                    pipe.hset(key, mapping={"version": table.version, "table": table.to_json()})
                    await pipe.execute()
                    return table
                except WatchError:
                    continue
        raise RuntimeError(f"tuning table update lost {attempts} races in a row; retry later")

    def export(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json() + "\n")

    @staticmethod
    def import_file(path: str) -> TuningTable:
        """A table written by export(); a bad file raises ValueError naming it."""
        try:
            with open(path, encoding="utf-8") as f:
                return TuningTable.from_json(f.read())
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a tuning table export: {exc}") from exc


def _interpolate(a: float | None, b: float | None, t: float) -> float | None:
    """Between a (at share lo) and b (at share hi), t = log(s/lo) / log(hi/lo): a power law
    through both ends (log-log linear). Below the knee a stage slows as a power of the share;
    above it nothing changes; the knee search leaves the kink between two adjacent measured
    shares, so a power law is exact on either side of it where linear interpolation is not."""
    if a is None or b is None:
        return a if b is None else b
    if a <= 0 or b <= 0:
        return a + t * (b - a)
    return a * (b / a) ** t


def _estimate(by_share: dict[float, ProfilePoint], share: float) -> ProfilePoint:
    shares = sorted(by_share)
    for s in shares:
        if abs(s - share) < _EPS:
            return by_share[s]
    below = [s for s in shares if s < share]
    above = [s for s in shares if s > share]
    if not above:
        return replace(by_share[below[-1]], share=share)
    hi = by_share[above[0]]
    if not below:
        f = share / above[0]
        scale = (lambda v: None if v is None else v / f)
        return replace(hi, share=share, throughput_tokens_per_s=hi.throughput_tokens_per_s * f,
                       latency_p50_ms=scale(hi.latency_p50_ms), latency_p95_ms=scale(hi.latency_p95_ms))
    lo = by_share[below[-1]]
    t = math.log(share / below[-1]) / math.log(above[0] / below[-1])
    return replace(
        lo, share=share,
        throughput_tokens_per_s=_interpolate(lo.throughput_tokens_per_s, hi.throughput_tokens_per_s, t) or 0.0,
        latency_p50_ms=_interpolate(lo.latency_p50_ms, hi.latency_p50_ms, t),
        latency_p95_ms=_interpolate(lo.latency_p95_ms, hi.latency_p95_ms, t),
        samples=min(lo.samples, hi.samples),
    )


def nearest_workload(candidates: Iterable[dict[str, int]], observed: dict[str, int]) -> dict[str, int]:
    """The candidate closest to `observed` in log ratio over the keys both name (lengths
    matter by ratio: 64 vs 128 tokens is as far apart as 1024 vs 2048); {} when none."""
    candidates = list(candidates)
    best, best_d = {}, math.inf
    for c in candidates:
        common = [k for k in c if k in observed]
        d = sum(abs(math.log(max(c[k], 1) / max(observed[k], 1))) for k in common) if common else math.inf
        if d < best_d or (d == best_d and not best):
            best, best_d = c, d
    if best_d == math.inf:  # nothing comparable: the first, for a stable answer
        return min(candidates, key=lambda c: sorted(c.items())) if candidates else {}
    return best
