"""Metrics on hand-made RunData: percentiles, SLO attainment, goodput, GPU cost, reversals, convergence."""

from __future__ import annotations

import numpy as np
import pytest

from services.experiment.metrics import (
    Slo,
    attainment_over_time,
    convergence,
    load_at_changes,
    percentiles,
    reversals,
    summarize,
    worst_window,
)
from services.experiment.report import following
from services.sim.result import RunData, ScaleChange, StageSample


def _data() -> RunData:
    d = RunData()
    # 4 requests: two meet the SLO (TTFT <= 1 s, TPOT <= 0.1 s), one is slow to start, one timed out
    rows = [(0.0, "ok", 0.5, 2.5, 0.05), (10.0, "ok", 0.8, 1.8, 0.1), (70.0, "ok", 3.0, 4.0, 0.01),
            (80.0, "timeout", None, None, None)]
    for arrival, status, ttft, e2e, tpot in rows:
        d.arrival_s.append(arrival)
        d.prompt_tokens.append(100)
        d.output_tokens.append(11)
        d.status.append(status)
        d.ttft_s.append(ttft)
        d.e2e_s.append(e2e)
        d.tpot_s.append(tpot)
        d.queue_s.append(None if ttft is None else ttft / 2)
        d.prefill_s.append(None if ttft is None else ttft / 2)
    d.itl_values, d.itl_weights = [0.01, 0.05, 0.2], [98, 1, 1]
    d.duration_s, d.share_seconds, d.gpu_seconds_occupied = 100.0, 300.0, 400.0
    return d


def test_attainment_goodput_and_gpu_cost():
    s = summarize(_data(), Slo(ttft_s=1.0, tpot_s=0.1))
    assert s["requests"] == 4 and s["completed"] == 3 and s["failed"] == 1
    assert s["slo_attainment"] == pytest.approx(0.5)
    assert s["gpu_seconds_per_request"] == pytest.approx(100.0)  # 300 GPU-s over 3 completed
    assert s["mean_gpus"] == pytest.approx(3.0)
    span = 80.0  # from the first arrival to the last event: the timed-out request arrived at 80 s
    assert s["span_s"] == pytest.approx(span)  # (the last completion, 70 + 4, is earlier)
    assert s["goodput_rps_per_gpu"] == pytest.approx(2 / span / 3.0)
    assert s["tokens_per_s"] == pytest.approx(33 / span)
    assert s["ttft_p50_ms"] == pytest.approx(800.0)


def test_weighted_percentiles():
    out = percentiles(np.array([0.01, 0.05, 0.2]), np.array([98.0, 1.0, 1.0]))
    assert out["p50_ms"] == pytest.approx(10.0)
    assert out["p99_ms"] == pytest.approx(50.0)
    assert percentiles(np.array([]))["p95_ms"] is None


def test_attainment_over_time_bins_by_arrival():
    rows = attainment_over_time(_data(), Slo(1.0, 0.1), bin_s=60.0)
    assert rows == [(0.0, 1.0, 2), (60.0, 0.0, 2)]


def _changes(*pairs: tuple[float, int, int]) -> RunData:
    d = RunData()
    d.changes = [ScaleChange(t, "decode", a, b) for t, a, b in pairs]
    return d


def test_reversals_count_direction_changes_only():
    d = _changes((0, 1, 2), (10, 2, 4), (20, 4, 3), (30, 3, 2), (700, 2, 5), (800, 5, 4))
    d.changes.append(ScaleChange(15, "prefill", 1, 0))  # another stage does not count
    count, times = reversals(d, "decode")
    assert count == 3 and times == [20, 700, 800]
    assert worst_window(times) == 2  # 700 and 800 lie within 10 minutes; 20 does not join them
    assert worst_window([0, 100, 200, 599.9]) == 4


def test_convergence_after_a_load_step():
    d = RunData()
    for t, target in [(0, 2), (10, 2), (20, 4), (30, 6), (40, 5), (50, 6), (60, 6), (70, 6)]:
        d.timeline.append(StageSample(t, "decode", target, 0, 0, 0, target, 1.0, 0.0, 0))
    assert convergence(d, "decode", 10.0, 70.0) == pytest.approx(40.0)  # settles on 6 at 50 s
    assert convergence(d, "prefill", 10.0, 70.0) is None


def test_summary_reports_per_stage_replicas_and_reversals():
    d = _data()
    d.timeline = [StageSample(t, "decode", r, 1, 0, 0, r + 1, r + 1.0, 0.0, 0) for t, r in [(0, 1), (50, 3)]]
    d.changes = [ScaleChange(0, "decode", 1, 2), ScaleChange(50, "decode", 2, 1)]
    s = summarize(d, Slo(1.0, 0.1), load_steps=[0.0])
    dec = s["stages"]["decode"]
    assert dec["mean_replicas"] == pytest.approx(3.0)  # ready + starting: 2 then 4
    assert dec["reversals"] == 1 and dec["scale_events"] == 2
    assert dec["reversals_per_10min"] == pytest.approx(1 / (100 / 600))
    assert dec["convergence_s"] == [50.0]


def _following_data() -> RunData:
    d = _data()
    # decode load: 10 tok/s, 100 tok/s from 120 s to 240 s, then 10 again; polled every 10 s
    for t in range(0, 400, 10):
        load = 100.0 if 120 <= t < 240 else 10.0
        d.timeline.append(StageSample(float(t), "decode", 1, 0, 0, 0, 1, 1.0, load, 0))
    d.changes = [ScaleChange(180.0, "decode", 1, 3), ScaleChange(350.0, "decode", 3, 1),
                 ScaleChange(200.0, "prefill", 1, 2)]
    return d


def test_scale_changes_carry_the_load_of_the_minute_before():
    mean, changes = load_at_changes(_following_data(), "decode")
    assert mean == pytest.approx((12 * 100 + 28 * 10) / 40)
    assert [(c["time"], c["from"], c["to"]) for c in changes] == [(180.0, 1, 3), (350.0, 3, 1)]
    assert changes[0]["load"] == pytest.approx(100.0)  # samples 120..180: all in the high phase
    assert changes[1]["load"] == pytest.approx(10.0)
    s = summarize(_following_data(), Slo(1.0, 0.1))["stages"]
    assert s["decode"]["changes"] == changes and s["prefill"]["changes"][0]["load"] is None  # no prefill samples


def test_report_says_whether_the_count_follows_the_load():
    s = summarize(_following_data(), Slo(1.0, 0.1))
    text = "\n".join(following({"elastic": s}, ("decode",)))
    assert "up 1->3 at 180 s (100 tok/s, 2.70x)" in text and "down 3->1 at 350 s (10 tok/s, 0.27x)" in text
    assert "the count follows the load" in text
    # a scale-up at a lower load than a scale-down is not called following
    s["stages"]["decode"]["changes"][0]["load"] = 5.0
    assert "follows the load" not in "\n".join(following({"elastic": s}, ("decode",)))
    assert following({"static": summarize(_data(), Slo(1.0, 0.1))}, ("decode",)) == [
        "- No run changed its replica count."]


def test_a_change_before_a_full_minute_of_load_has_no_load():
    d = _following_data()
    d.changes = [ScaleChange(30.0, "decode", 2, 1)] + d.changes
    _, changes = load_at_changes(d, "decode")
    assert changes[0]["load"] is None and changes[1]["load"] == pytest.approx(100.0)
