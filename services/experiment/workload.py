"""The requests of an experiment, from its WorkloadConfig, with bench/workloads.py generators. Seeded.

bench/ is a folder of scripts beside services/, importable when elastune runs from the repository
root (`python -m services.cli ...`), as the experiment commands do.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench import workloads
from bench.workloads import Request

from .config import WorkloadConfig

JITTER_S = 1.0  # copies of a trace request land within +-1 s of it: the minute-scale shape stays


def shared_dir() -> Path:
    return Path(os.environ.get("ELASTUNE_SHARED") or Path(__file__).resolve().parents[3] / "shared")


def default_trace() -> Path:
    return shared_dir() / "traces" / "azure_conv_2023.csv"


def amplify(requests: list[Request], factor: float, seed: int) -> list[Request]:
    """About `factor` times the requests over the same span: each request is kept floor(factor)
    times plus once more with probability frac(factor), every copy jittered in time."""
    if factor == 1.0:
        return list(requests)
    rng = np.random.default_rng([seed, 7])
    whole, frac = int(factor), factor - int(factor)
    out = []
    for r in requests:
        copies = whole + (1 if rng.random() < frac else 0)
        for c in range(copies):
            t = r.arrival_s if c == 0 else max(r.arrival_s + rng.uniform(-JITTER_S, JITTER_S), 0.0)
            out.append(replace(r, arrival_s=t))
    out.sort(key=lambda r: r.arrival_s)
    return out


def steps(segments: tuple[tuple[float, float], ...], duration_s: float, seed: int, **lengths) -> list[Request]:
    """Poisson load whose rate steps: segment i runs at its rate from its start to the next start."""
    out: list[Request] = []
    ends = [t for t, _ in segments[1:]] + [duration_s]
    for i, ((start, rate), end) in enumerate(zip(segments, ends)):
        if rate > 0 and end > start:
            part = workloads.poisson(rate, end - start, seed * 1000 + i, **lengths)
            out += [replace(r, arrival_s=r.arrival_s + start) for r in part]
    out.sort(key=lambda r: r.arrival_s)
    return out


def build(cfg: WorkloadConfig, seed: int) -> list[Request]:
    lengths = {"prompt_short_median": cfg.prompt_median, "prompt_long_median": cfg.prompt_median * 8,
               "prompt_max_tokens": max(cfg.max_context or 8192, 2), "output_median": cfg.output_median,
               "output_max_tokens": cfg.max_output or 2048}
    if cfg.kind == "trace":
        reqs = workloads.load_trace(cfg.path or default_trace())
        if cfg.start_s or cfg.duration_s:
            reqs = workloads.window(reqs, cfg.start_s, cfg.duration_s or float("inf"))
        reqs = amplify(workloads.scale_rate(reqs, cfg.rate_scale), cfg.rate_multiplier, seed)
    elif cfg.kind == "poisson":
        reqs = workloads.poisson(cfg.rate, cfg.duration_s, seed, **lengths)
    elif cfg.kind == "gamma":
        reqs = workloads.gamma(cfg.rate, cfg.cv, cfg.duration_s, seed, **lengths)
    elif cfg.kind == "onoff":
        reqs = workloads.onoff(cfg.rate, cfg.mean_on_s, cfg.mean_off_s, cfg.duration_s, seed, **lengths)
    else:
        reqs = steps(cfg.steps, cfg.duration_s, seed, **lengths)
    if cfg.max_context:
        reqs = workloads.scale_lengths(reqs, cfg.max_context, cfg.max_output or None)
    return reqs


def load_steps(cfg: WorkloadConfig) -> list[float]:
    """Times of the load steps convergence is measured after (steps workloads only)."""
    return [t for t, _ in cfg.steps][1:] if cfg.kind == "steps" else []
