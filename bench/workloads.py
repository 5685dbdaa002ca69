"""Benchmark workloads: seeded synthetic arrivals and lengths, and real trace replay.

Every generator returns a list of `Request`s sorted by arrival time (seconds from 0).
Synthetic generators are pure functions of their arguments and seed.

    reqs = poisson(rate=4.0, duration_s=60.0, seed=0)
    reqs = load_azure_csv("/work/shared/traces/azure_conv_2023.csv")
    reqs = scale_lengths(scale_rate(window(reqs, 0, 600), 2.0), max_context=4096)
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Request:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prefix_group: int | None = None


# ---------------------------------------------------------------- arrival processes


def poisson_arrivals(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of a Poisson process of `rate` per second over [0, duration_s)."""
    return gamma_arrivals(rate, 1.0, duration_s, rng)


def gamma_arrivals(rate: float, cv: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Renewal process with Gamma inter-arrival gaps of mean 1/rate and coefficient of variation cv."""
    if rate <= 0 or cv <= 0:
        raise ValueError("rate and cv must be positive")
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    times: list[np.ndarray] = []
    t = 0.0
    batch = max(16, int(rate * duration_s * 1.2) + 16)
    while t < duration_s:
        gaps = rng.gamma(shape, scale, size=batch)
        chunk = t + np.cumsum(gaps)
        times.append(chunk)
        t = float(chunk[-1])
    all_times = np.concatenate(times) if times else np.empty(0)
    return all_times[all_times < duration_s]


def mmpp_arrivals(
    rates: list[float],
    transitions: list[list[float]],
    duration_s: float,
    rng: np.random.Generator,
    start_state: int = 0,
) -> np.ndarray:
    """Markov-modulated Poisson process: state i emits at rates[i]; transitions[i][j] is the
    rate (per second) of moving from state i to state j (the diagonal is ignored)."""
    k = len(rates)
    q = np.asarray(transitions, dtype=float)
    if q.shape != (k, k):
        raise ValueError("transitions must be a k x k matrix")
    out: list[np.ndarray] = []
    t, state = 0.0, start_state
    while t < duration_s:
        leave = np.array([q[state, j] if j != state else 0.0 for j in range(k)])
        total = float(leave.sum())
        stay = rng.exponential(1.0 / total) if total > 0 else duration_s - t
        end = min(t + stay, duration_s)
        if rates[state] > 0:
            n = rng.poisson(rates[state] * (end - t))
            out.append(np.sort(rng.uniform(t, end, size=n)))
        t = end
        if total > 0:
            state = int(rng.choice(k, p=leave / total))
    return np.concatenate(out) if out else np.empty(0)


def onoff_arrivals(
    rate_on: float, mean_on_s: float, mean_off_s: float, duration_s: float, rng: np.random.Generator
) -> np.ndarray:
    """Bursts: Poisson at rate_on during exponential on periods, silent during exponential off periods."""
    return mmpp_arrivals(
        [rate_on, 0.0], [[0.0, 1.0 / mean_on_s], [1.0 / mean_off_s, 0.0]], duration_s, rng
    )


# ---------------------------------------------------------------- lengths


def mixture_prompt_lengths(
    n: int,
    rng: np.random.Generator,
    frac_long: float = 0.2,
    short_median: float = 256,
    long_median: float = 4096,
    sigma: float = 0.5,
    max_tokens: int = 8192,
) -> np.ndarray:
    """Two-component lognormal mixture: a `frac_long` share around long_median, the rest short."""
    is_long = rng.random(n) < frac_long
    medians = np.where(is_long, long_median, short_median)
    values = medians * np.exp(sigma * rng.standard_normal(n))
    return np.clip(np.rint(values), 1, max_tokens).astype(int)


def longtail_output_lengths(
    n: int,
    rng: np.random.Generator,
    median: float = 128,
    sigma: float = 1.0,
    max_tokens: int = 2048,
    dist: str = "lognormal",
    pareto_alpha: float = 1.5,
) -> np.ndarray:
    """Long-tailed output lengths (lognormal by median and sigma, or Pareto with minimum
    median / 2**(1/alpha) so its median matches), clipped to [1, max_tokens]."""
    if dist == "lognormal":
        values = median * np.exp(sigma * rng.standard_normal(n))
    elif dist == "pareto":
        x_min = median / 2 ** (1.0 / pareto_alpha)
        values = x_min * (1.0 + rng.pareto(pareto_alpha, size=n))
    else:
        raise ValueError(f"unknown output length distribution {dist!r}")
    return np.clip(np.rint(values), 1, max_tokens).astype(int)


def attach_lengths(arrivals: np.ndarray, rng: np.random.Generator, **length_args: float) -> list[Request]:
    """Requests at `arrivals` with mixture prompt and long-tailed output lengths.
    length_args keys prefixed `prompt_` / `output_` go to the respective generator."""
    prompt_args = {k[7:]: v for k, v in length_args.items() if k.startswith("prompt_")}
    output_args = {k[7:]: v for k, v in length_args.items() if k.startswith("output_")}
    n = len(arrivals)
    prompts = mixture_prompt_lengths(n, rng, **prompt_args)
    outputs = longtail_output_lengths(n, rng, **output_args)
    return [
        Request(float(a), int(p), int(o)) for a, p, o in zip(np.sort(arrivals), prompts, outputs)
    ]


def poisson(rate: float, duration_s: float, seed: int = 0, **length_args) -> list[Request]:
    rng = np.random.default_rng(seed)
    return attach_lengths(poisson_arrivals(rate, duration_s, rng), rng, **length_args)


def gamma(rate: float, cv: float, duration_s: float, seed: int = 0, **length_args) -> list[Request]:
    rng = np.random.default_rng(seed)
    return attach_lengths(gamma_arrivals(rate, cv, duration_s, rng), rng, **length_args)


def onoff(
    rate_on: float, mean_on_s: float, mean_off_s: float, duration_s: float, seed: int = 0, **length_args
) -> list[Request]:
    rng = np.random.default_rng(seed)
    arrivals = onoff_arrivals(rate_on, mean_on_s, mean_off_s, duration_s, rng)
    return attach_lengths(arrivals, rng, **length_args)


def mmpp(
    rates: list[float], transitions: list[list[float]], duration_s: float, seed: int = 0, **length_args
) -> list[Request]:
    rng = np.random.default_rng(seed)
    return attach_lengths(mmpp_arrivals(rates, transitions, duration_s, rng), rng, **length_args)


# ---------------------------------------------------------------- trace replay


def _parse_time(value: str) -> float:
    """Seconds since the epoch from a number or a 'YYYY-MM-DD HH:MM:SS.fffffff' timestamp."""
    try:
        return float(value)
    except ValueError:
        pass
    date, _, frac = value.strip().partition(".")
    base = datetime.strptime(date, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def _finish(rows: list[tuple[float, int, int, int | None]]) -> list[Request]:
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0] if rows else 0.0
    return [Request(t - t0, p, o, g) for t, p, o, g in rows]


def load_azure_csv(path: str | Path) -> list[Request]:
    """Azure LLM trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens); times from the first row."""
    with open(path, newline="") as f:
        rows = [
            (_parse_time(r["TIMESTAMP"]), int(r["ContextTokens"]), int(r["GeneratedTokens"]), None)
            for r in csv.DictReader(f)
        ]
    return _finish(rows)


def load_mooncake_jsonl(path: str | Path) -> list[Request]:
    """Mooncake JSONL (timestamp ms, input_length, output_length, hash_ids); the prefix
    group is the first hash id (equal ids share a 512-token prefix block)."""
    rows = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            hashes = r.get("hash_ids") or []
            group = int(hashes[0]) if hashes else None
            rows.append((float(r["timestamp"]) / 1000.0, int(r["input_length"]), int(r["output_length"]), group))
    return _finish(rows)


def load_trace(path: str | Path) -> list[Request]:
    """Either trace format, by extension (.csv Azure columns, .jsonl Mooncake fields)."""
    return load_mooncake_jsonl(path) if str(path).endswith((".jsonl", ".json")) else load_azure_csv(path)


def scale_rate(requests: list[Request], factor: float) -> list[Request]:
    """Replay `factor` times faster: arrival times divided by factor."""
    return [replace(r, arrival_s=r.arrival_s / factor) for r in requests]


def scale_lengths(requests: list[Request], max_context: int, max_output: int | None = None) -> list[Request]:
    """Scale prompt and output lengths by one factor so the p99 of prompt+output fits in
    max_context (never scaled up), then clip every request to fit (and output to max_output)."""
    if not requests:
        return []
    totals = np.array([r.prompt_tokens + r.output_tokens for r in requests], dtype=float)
    factor = min(1.0, max_context / float(np.percentile(totals, 99)))
    out = []
    for r in requests:
        output = max(1, round(r.output_tokens * factor))
        if max_output is not None:
            output = min(output, max_output)
        output = min(output, max_context - 1)
        prompt = min(max(1, round(r.prompt_tokens * factor)), max_context - output)
        out.append(replace(r, prompt_tokens=prompt, output_tokens=output))
    return out


def window(requests: list[Request], start_s: float, duration_s: float) -> list[Request]:
    """Requests arriving in [start_s, start_s + duration_s), re-based to start at 0."""
    return [
        replace(r, arrival_s=r.arrival_s - start_s)
        for r in requests
        if start_s <= r.arrival_s < start_s + duration_s
    ]


def summary(requests: list[Request]) -> dict[str, float]:
    """Count, duration, rate, and mean/p50/p99 of prompt and output tokens."""
    if not requests:
        return {"count": 0, "duration_s": 0.0, "rate": 0.0}
    arrivals = np.array([r.arrival_s for r in requests])
    duration = float(arrivals.max() - arrivals.min())
    result: dict[str, float] = {
        "count": len(requests),
        "duration_s": duration,
        "rate": len(requests) / duration if duration > 0 else 0.0,
    }
    for name in ("prompt", "output"):
        values = np.array([getattr(r, f"{name}_tokens") for r in requests], dtype=float)
        result[f"{name}_mean"] = float(values.mean())
        result[f"{name}_p50"] = float(np.percentile(values, 50))
        result[f"{name}_p99"] = float(np.percentile(values, 99))
    return result
