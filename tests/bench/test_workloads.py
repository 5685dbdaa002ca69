"""Workload generators: determinism, statistical shape, clipping, and real trace replay."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bench import workloads as wl
from bench.workloads import Request


def _traces() -> Path:
    root = os.environ.get("ELASTUNE_SHARED") or Path(__file__).resolve().parents[3] / "shared"
    return Path(root) / "traces"


def _gaps(reqs: list[Request]) -> np.ndarray:
    return np.diff([r.arrival_s for r in reqs])


def test_seeded_determinism_and_sorted() -> None:
    a = wl.poisson(5.0, 100.0, seed=1)
    assert a == wl.poisson(5.0, 100.0, seed=1)
    assert a != wl.poisson(5.0, 100.0, seed=2)
    for gen in (lambda s: wl.gamma(5.0, 3.0, 100.0, s), lambda s: wl.onoff(10.0, 2.0, 5.0, 100.0, s),
                lambda s: wl.mmpp([1.0, 9.0], [[0, 0.2], [0.2, 0]], 100.0, s)):
        assert gen(3) == gen(3)
        assert gen(3) != gen(4)
        arrivals = [r.arrival_s for r in gen(3)]
        assert arrivals == sorted(arrivals) and 0 <= arrivals[0] and arrivals[-1] < 100.0


def test_poisson_rate_and_cv() -> None:
    reqs = wl.poisson(8.0, 2000.0, seed=0)
    assert len(reqs) / 2000.0 == pytest.approx(8.0, rel=0.1)
    gaps = _gaps(reqs)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_cv(cv: float) -> None:
    reqs = wl.gamma(5.0, cv, 4000.0, seed=0)
    gaps = _gaps(reqs)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.15)
    assert len(reqs) / 4000.0 == pytest.approx(5.0, rel=0.15)


def test_onoff_has_idle_gaps() -> None:
    mean_off = 5.0
    reqs = wl.onoff(20.0, 2.0, mean_off, 600.0, seed=0)
    gaps = _gaps(reqs)
    long_gaps = gaps[gaps >= mean_off]
    # ~600/7 off periods, exponential: P(off >= mean) = e^-1, so dozens of such gaps.
    assert len(long_gaps) >= 10
    # during on periods at 20/s almost all gaps are tiny
    assert np.median(gaps) < 0.2
    # long-run rate is rate_on * on-share = 20 * 2/7
    assert len(reqs) / 600.0 == pytest.approx(20.0 * 2.0 / 7.0, rel=0.3)


def test_mmpp_rate_between_states() -> None:
    reqs = wl.mmpp([1.0, 10.0, 4.0], [[0, 0.1, 0.1], [0.1, 0, 0.1], [0.1, 0.1, 0]], 3000.0, seed=0)
    rate = len(reqs) / 3000.0
    assert 1.0 < rate < 10.0
    assert rate == pytest.approx(5.0, rel=0.3)  # symmetric switching: mean of state rates


def test_prompt_mixture_fraction_and_clipping() -> None:
    rng = np.random.default_rng(0)
    lengths = wl.mixture_prompt_lengths(20000, rng, frac_long=0.3, short_median=100,
                                        long_median=5000, sigma=0.5, max_tokens=8000)
    assert np.mean(lengths > 700) == pytest.approx(0.3, abs=0.02)
    assert lengths.min() >= 1 and lengths.max() <= 8000
    assert (lengths == 8000).any()  # the clip is hit, not just respected
    assert np.median(lengths[lengths < 700]) == pytest.approx(100, rel=0.1)


@pytest.mark.parametrize("dist", ["lognormal", "pareto"])
def test_output_lengths_long_tailed_and_clipped(dist: str) -> None:
    rng = np.random.default_rng(0)
    out = wl.longtail_output_lengths(20000, rng, median=100, max_tokens=3000, dist=dist)
    assert out.min() >= 1 and out.max() <= 3000
    assert np.median(out) == pytest.approx(100, rel=0.15)
    assert np.percentile(out, 99) > 5 * np.median(out)


def test_scale_rate_window_scale_lengths_synthetic() -> None:
    reqs = [Request(float(i), 1000 + i, 200, None) for i in range(100)]
    fast = wl.scale_rate(reqs, 4.0)
    assert fast[-1].arrival_s == pytest.approx(99 / 4.0)
    win = wl.window(reqs, 10.0, 5.0)
    assert [r.arrival_s for r in win] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert win[0].prompt_tokens == 1010
    fit = wl.scale_lengths(reqs, max_context=600, max_output=50)
    assert all(r.prompt_tokens + r.output_tokens <= 600 for r in fit)
    assert all(1 <= r.output_tokens <= 50 for r in fit)
    assert wl.scale_lengths(reqs, max_context=100000) == reqs  # never scaled up


def test_summary_fields() -> None:
    s = wl.summary([Request(0.0, 10, 1), Request(2.0, 30, 3)])
    assert s["count"] == 2 and s["duration_s"] == 2.0 and s["rate"] == 1.0
    assert s["prompt_mean"] == 20.0 and s["output_p50"] == 2.0


def test_generic_csv_and_jsonl(tmp_path: Path) -> None:
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                        "2023-11-16 18:15:47.5000000,5,6\n2023-11-16 18:15:46.0000000,3,4\n")
    reqs = wl.load_trace(csv_path)
    assert reqs == [Request(0.0, 3, 4, None), Request(1.5, 5, 6, None)]
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"timestamp": 500, "input_length": 7, "output_length": 2, "hash_ids": [9, 10]}\n'
                  '{"timestamp": 2500, "input_length": 8, "output_length": 3, "hash_ids": []}\n')
    assert wl.load_trace(jl) == [Request(0.0, 7, 2, 9), Request(2.0, 8, 3, None)]


@pytest.fixture(scope="module")
def azure() -> list[Request]:
    path = _traces() / "azure_conv_2023.csv"
    if not path.exists():
        pytest.skip(f"{path} absent")
    return wl.load_azure_csv(path)


def test_azure_trace(azure: list[Request]) -> None:
    s = wl.summary(azure)
    assert s["count"] == 19366
    assert 57 * 60 < s["duration_s"] < 59 * 60
    assert s["rate"] == pytest.approx(5.5, rel=0.03)
    assert s["prompt_p99"] == pytest.approx(4142, rel=0.01)
    half = wl.summary(wl.scale_rate(azure, 2.0))
    assert half["duration_s"] == pytest.approx(s["duration_s"] / 2)
    fit = wl.scale_lengths(azure, max_context=2048)
    totals = np.array([r.prompt_tokens + r.output_tokens for r in fit])
    assert totals.max() <= 2048
    assert np.percentile(totals, 90) < 2048  # scaled proportionally, not just clipped
    assert len(wl.window(azure, 600.0, 60.0)) == pytest.approx(60 * 5.5, rel=0.5)


def test_mooncake_trace() -> None:
    path = _traces() / "mooncake_synthetic.jsonl"
    if not path.exists():
        pytest.skip(f"{path} absent")
    reqs = wl.load_mooncake_jsonl(path)
    assert len(reqs) == 3993
    assert reqs[0].prefix_group is not None
    assert 15 * 60 < wl.summary(reqs)["duration_s"] < 19 * 60
    groups = [r.prefix_group for r in reqs]
    assert len(set(groups)) < len(groups)  # some requests share a prefix
