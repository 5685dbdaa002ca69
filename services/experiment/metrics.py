"""Figures of one run from its RunData: latency percentiles, throughput, SLO attainment, goodput,
GPU cost and scaling behaviour. Pure (numpy only).

Definitions:
- A request meets the SLO when it completed, its TTFT <= slo.ttft_s and its TPOT (mean time per
  output token after the first) <= slo.tpot_s. Attainment = meeting / all requests sent.
- Goodput (DistServe's sense): requests/s meeting the SLO per GPU, with GPUs the mean allocated
  GPU share over the run (GPU-seconds / duration).
- GPU-seconds: sum over pods of seconds placed on a GPU x its share; per request: / completed.
- A direction reversal: a scale change whose direction differs from the stage's previous change.
  Reported per 10 minutes of run (mean) and in the worst 10-minute window.
- Convergence after a load step at time t: how long until the stage's target reaches the value it
  holds at the end of the step's span and keeps it to the end of the span.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from services.sim.result import RunData

QUANTILES = (50, 95, 99)
REVERSAL_WINDOW_S = 600.0
LOAD_BEFORE_S = 60.0  # a scale change is compared with the stage's load over the minute before it


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float


def _col(values: list[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=float)


def percentiles(values: np.ndarray, weights: np.ndarray | None = None, prefix: str = "") -> dict[str, float | None]:
    """p50/p95/p99 in ms of the finite values (weighted: the smallest value whose cumulative weight
    reaches q% of the total)."""
    keep = np.isfinite(values)
    values = values[keep]
    if values.size == 0:
        return {f"{prefix}p{q}_ms": None for q in QUANTILES}
    if weights is None:
        return {f"{prefix}p{q}_ms": float(np.percentile(values, q)) * 1000 for q in QUANTILES}
    weights = weights[keep]
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    out = {}
    for q in QUANTILES:
        idx = int(np.searchsorted(cum, q / 100 * cum[-1]))
        out[f"{prefix}p{q}_ms"] = float(values[order][min(idx, values.size - 1)]) * 1000
    return out


def meets_slo(data: RunData, slo: Slo) -> np.ndarray:
    ok = np.array([s == "ok" for s in data.status], dtype=bool)
    ttft, tpot = _col(data.ttft_s), _col(data.tpot_s)
    with np.errstate(invalid="ignore"):
        return ok & (ttft <= slo.ttft_s) & (tpot <= slo.tpot_s)


def reversals(data: RunData, stage: str) -> tuple[int, list[float]]:
    """(count, times) of direction reversals of the stage's scale changes."""
    times, last = [], 0
    for change in data.changes:
        if change.stage != stage or change.to_replicas == change.from_replicas:
            continue
        direction = 1 if change.to_replicas > change.from_replicas else -1
        if last and direction != last:
            times.append(change.time)
        last = direction
    return len(times), times


def worst_window(times: list[float], span_s: float = REVERSAL_WINDOW_S) -> int:
    """Most events inside any window of span_s seconds."""
    best, start = 0, 0
    for end in range(len(times)):
        while times[end] - times[start] >= span_s:
            start += 1
        best = max(best, end - start + 1)
    return best


def convergence(data: RunData, stage: str, step_s: float, span_end_s: float) -> float | None:
    """Seconds from a load step until the stage's target settles (None: never within the span)."""
    samples = [(s.time, s.target) for s in data.timeline if s.stage == stage and step_s <= s.time <= span_end_s]
    if not samples:
        return None
    final = samples[-1][1]
    settled = None
    for t, target in samples:
        if target != final:
            settled = None
        elif settled is None:
            settled = t
    return None if settled is None else settled - step_s


def stage_replicas(data: RunData, stage: str) -> dict[str, float]:
    rows = [s for s in data.timeline if s.stage == stage]
    if not rows:
        return {"mean_replicas": 0.0, "max_replicas": 0, "mean_ready": 0.0, "mean_share": 0.0}
    total = [s.ready + s.starting + s.draining for s in rows]
    return {"mean_replicas": float(np.mean(total)), "max_replicas": int(max(total)),
            "mean_ready": float(np.mean([s.ready for s in rows])), "mean_share": float(np.mean([s.share for s in rows]))}


def load_at_changes(data: RunData, stage: str, before_s: float = LOAD_BEFORE_S) -> tuple[float, list[dict]]:
    """The stage's mean load over the run, and each scale change with the stage's mean load
    (tokens/s) over the before_s seconds up to it: does the count follow the load?"""
    samples = [(s.time, s.load_tokens_per_s) for s in data.timeline if s.stage == stage]
    mean = float(np.mean([v for _, v in samples])) if samples else 0.0
    out = []
    for c in data.changes:
        if c.stage != stage or c.to_replicas == c.from_replicas:
            continue
        seen = [v for t, v in samples if c.time - before_s <= t <= c.time]
        # a change in the first minute (the start count meeting the autoscaler) saw no minute of load
        full = bool(samples) and c.time - before_s >= samples[0][0]
        out.append({"time": c.time, "from": c.from_replicas, "to": c.to_replicas,
                    "load": float(np.mean(seen)) if seen and full else None})
    return mean, out


def attainment_over_time(data: RunData, slo: Slo, bin_s: float = 60.0) -> list[tuple[float, float, int]]:
    """(bin start, attainment, requests) per bin of arrival time."""
    arrival = np.array(data.arrival_s, dtype=float)
    if arrival.size == 0:
        return []
    good = meets_slo(data, slo)
    bins = np.floor(arrival / bin_s).astype(int)
    counts = np.bincount(bins)
    hits = np.bincount(bins, weights=good.astype(float))
    return [(i * bin_s, float(hits[i] / counts[i]), int(counts[i])) for i in range(counts.size) if counts[i]]


def summarize(data: RunData, slo: Slo, stages: tuple[str, ...] = ("prefill", "decode"),
              load_steps: list[float] | None = None) -> dict:
    n = len(data)
    ok = np.array([s == "ok" for s in data.status], dtype=bool)
    arrival = np.array(data.arrival_s, dtype=float)
    e2e = _col(data.e2e_s)
    out: dict = {"requests": n, "completed": int(ok.sum()), "failed": int(n - ok.sum())}
    out.update(percentiles(_col(data.ttft_s)[ok], prefix="ttft_"))
    out.update(percentiles(_col(data.tpot_s)[ok], prefix="tpot_"))
    out.update(percentiles(e2e[ok], prefix="e2e_"))
    out.update(percentiles(np.array(data.itl_values, dtype=float), np.array(data.itl_weights, dtype=float), "itl_"))
    out["stages"] = {
        "prefill": {**percentiles(_col(data.queue_s)[ok], prefix="queue_"),
                    **percentiles(_col(data.prefill_s)[ok], prefix="service_")},
        "decode": {**percentiles(np.array(data.itl_values, dtype=float), np.array(data.itl_weights, dtype=float), "itl_"),
                   **percentiles(_col(data.tpot_s)[ok], prefix="tpot_")},
    }
    span = float(np.nanmax(arrival + np.nan_to_num(e2e)) - arrival.min()) if n else 0.0
    out["span_s"] = span
    out["tokens_per_s"] = float(np.array(data.output_tokens)[ok].sum() / span) if span > 0 else 0.0
    out["requests_per_s"] = float(ok.sum() / span) if span > 0 else 0.0
    good = meets_slo(data, slo)
    out["slo"] = {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}
    out["slo_attainment"] = float(good.mean()) if n else 0.0
    duration = data.duration_s or span
    out["gpu_seconds"] = data.share_seconds
    out["gpu_seconds_occupied"] = data.gpu_seconds_occupied
    out["mean_gpus"] = data.share_seconds / duration if duration > 0 else 0.0
    out["gpu_seconds_per_request"] = data.share_seconds / ok.sum() if ok.sum() else None
    out["goodput_rps_per_gpu"] = (good.sum() / span) / out["mean_gpus"] if span > 0 and out["mean_gpus"] > 0 else 0.0
    tens = max(duration / REVERSAL_WINDOW_S, 1e-9)
    for stage in stages:
        count, times = reversals(data, stage)
        row = out["stages"].setdefault(stage, {})
        row.update(stage_replicas(data, stage))
        row["gpu_seconds"] = data.share_seconds_by_stage.get(stage)  # None: a run recorded without the split
        row["scale_events"] = sum(1 for c in data.changes if c.stage == stage)
        row["reversals"] = count
        row["reversals_per_10min"] = count / tens
        row["reversals_worst_10min"] = worst_window(times)
        row["load_mean_tokens_per_s"], row["changes"] = load_at_changes(data, stage)
        if load_steps:
            ends = list(load_steps[1:]) + [duration]
            row["convergence_s"] = [convergence(data, stage, t, end) for t, end in zip(load_steps, ends)]
    return out
