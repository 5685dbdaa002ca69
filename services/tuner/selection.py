"""Runtime config selection for one pod at its GPU share, and the prefill/decode share split.

choose() is the inner loop's decision: among the configs profiled at the pod's share, the one
with the most throughput within the latency SLO, kept stable by hysteresis so that noise in the
table or the load does not make the worker swap configs at every tick.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .table import ProfilePoint, TuningTable, best_within_slo

_EPS = 1e-9


@dataclass(frozen=True)
class Choice:
    config: dict[str, int]
    reason: str  # "best", "kept", "overloaded", "no_config_meets_slo"
    expected_throughput: float
    expected_p95_ms: float | None


def _choice(point: ProfilePoint, reason: str) -> Choice:
    return Choice(dict(point.config), reason, point.throughput_tokens_per_s, point.latency_p95_ms)


def _lowest_latency(points: Sequence[ProfilePoint]) -> ProfilePoint:
    def latency(p: ProfilePoint) -> tuple[float, int]:
        return (p.latency_p95_ms if p.latency_p95_ms is not None else float("inf"), p.batch)

    return min(points, key=latency)


def choose(
    points: Sequence[ProfilePoint],
    load_tokens_per_s: float,
    slo_p95_ms: float,
    current: dict[str, int] | None = None,
    hysteresis: float = 0.05,
) -> Choice:
    """Pick a config from the points profiled at the pod's share.

    Feasible: p95 <= SLO and throughput >= the observed load. The best feasible config is the one
    with the most throughput (ties: the smaller batch, which has the lower latency). `current` is
    kept while it is feasible and the best beats its throughput by no more than `hysteresis`
    (a fraction). When nothing carries the load within the SLO ("overloaded"), the config with
    the most throughput within the SLO is picked (the scaler adds pods); when nothing meets the
    SLO at all, the lowest-latency config ("no_config_meets_slo").
    """
    if not points:
        raise ValueError("choose needs at least one profiled point")
    within_slo = [p for p in points if p.meets(slo_p95_ms)]
    if not within_slo:
        return _choice(_lowest_latency(points), "no_config_meets_slo")
    feasible = [p for p in within_slo if p.throughput_tokens_per_s >= load_tokens_per_s]
    best = best_within_slo(feasible or within_slo, slo_p95_ms)
    assert best is not None
    if not feasible:
        return _choice(best, "overloaded")
    if current is not None:
        mine = [p for p in feasible if p.config == current]
        if mine and best.throughput_tokens_per_s <= mine[0].throughput_tokens_per_s * (1.0 + hysteresis):
            return _choice(mine[0], "kept")
    return _choice(best, "best")


def choose_for_share(
    table: TuningTable,
    model: str,
    stage: str,
    device: str,
    share: float,
    load_tokens_per_s: float,
    slo_p95_ms: float,
    current: dict[str, int] | None = None,
    hysteresis: float = 0.05,
) -> Choice:
    """choose() on the points of the nearest profiled share (the largest <= `share`).

    After a share change the current config is usually absent from, or dominated in, the new
    share's points, so the pod switches at once rather than waiting out the hysteresis.
    """
    profiled = table.nearest_share(model, stage, device, share)
    if profiled is None:
        raise LookupError(f"no profile for model={model} stage={stage} device={device}")
    return choose(table.points(model, stage, device, profiled), load_tokens_per_s, slo_p95_ms, current, hysteresis)


@dataclass(frozen=True)
class Split:
    prefill_share: float
    decode_share: float
    headroom: float  # min over both stages of capacity / load


def _capacities(points: Sequence[ProfilePoint], slo_p95_ms: float) -> dict[float, float]:
    """{share: best throughput within the SLO} for the shares where something meets it."""
    by_share: dict[float, list[ProfilePoint]] = {}
    for p in points:
        by_share.setdefault(p.share, []).append(p)
    caps: dict[float, float] = {}
    for share, rows in by_share.items():
        best = best_within_slo(rows, slo_p95_ms)
        if best is not None:
            caps[share] = best.throughput_tokens_per_s
    return caps


def recommend_split(
    prefill_points: Sequence[ProfilePoint],
    decode_points: Sequence[ProfilePoint],
    prefill_load: float,
    decode_load: float,
    prefill_slo_p95_ms: float,
    decode_slo_p95_ms: float,
) -> tuple[float, float] | None:
    """The (prefill share, decode share) for two processes sharing one GPU, or None.

    Candidates are pairs of profiled shares summing to <= 1 where each stage, at its best config
    within its SLO, carries its load. Prefill and decode tokens are not comparable, so "most
    spare throughput" is the largest worst-stage headroom, min(capacity / load) over the two
    (a load of 0 counts as infinite headroom); ties go to the smaller total share, then to the
    larger decode share. None: no pair meets both SLOs at these loads.
    """
    split = best_split(prefill_points, decode_points, prefill_load, decode_load, prefill_slo_p95_ms, decode_slo_p95_ms)
    return (split.prefill_share, split.decode_share) if split else None


def best_split(
    prefill_points: Sequence[ProfilePoint],
    decode_points: Sequence[ProfilePoint],
    prefill_load: float,
    decode_load: float,
    prefill_slo_p95_ms: float,
    decode_slo_p95_ms: float,
) -> Split | None:
    """recommend_split() with the headroom it found."""
    prefill_caps = _capacities(prefill_points, prefill_slo_p95_ms)
    decode_caps = _capacities(decode_points, decode_slo_p95_ms)

    def ratio(cap: float, load: float) -> float:
        return cap / load if load > 0.0 else float("inf")

    best: Split | None = None
    best_key: tuple[float, float, float] | None = None
    for ps, pcap in prefill_caps.items():
        for ds, dcap in decode_caps.items():
            if ps + ds > 1.0 + _EPS or pcap < prefill_load or dcap < decode_load:
                continue
            headroom = min(ratio(pcap, prefill_load), ratio(dcap, decode_load))
            key = (headroom, -(ps + ds), ds)
            if best_key is None or key > best_key:
                best, best_key = Split(ps, ds, headroom), key
    return best
