"""Admission rule on hand-made load reports (pure, no servers)."""

from __future__ import annotations

import pytest

from services.common.load_report import LoadReport
from services.gateway.admission import (
    ADMIT,
    KV_FULL,
    SLO,
    TOO_LARGE,
    AdmissionPolicy,
    AdmissionRequest,
    decide as decide_on_view,
    estimated_wait_s as wait_on_view,
    kv_room,
    summarize,
)

POLICY = AdmissionPolicy(ttft_slo_s=2.0, kv_reserve_fraction=0.0, min_retry_after_s=1.0, max_retry_after_s=30.0)


def decode(i=0, used=0, capacity=10_000, queued=0, out_rate=0.0, draining=False) -> LoadReport:
    return LoadReport(f"d{i}", "decode", f"d{i}:1", "h", "m", 0.0, queued_tokens=queued, kv_used_tokens=used,
                      kv_capacity_tokens=capacity, output_tokens_per_s=out_rate, draining=draining)


def prefill(i=0, queued=0, rate=0.0) -> LoadReport:
    return LoadReport(f"p{i}", "prefill", f"p{i}:1", "h", "m", 0.0, queued_tokens=queued, prompt_tokens_per_s=rate)


def decide(request, prefill, decode_, local, policy):
    return decide_on_view(request, summarize(prefill, decode_, policy), local, policy)


def estimated_wait_s(prefill, decode_, local, prompt):
    return wait_on_view(summarize(prefill, decode_, POLICY), local, prompt)


def req(prompt=100, max_tokens=100, deadline=60.0) -> AdmissionRequest:
    return AdmissionRequest(prompt, max_tokens, deadline)


def test_idle_fleet_admits():
    assert decide(req(), [prefill()], [decode()], 0, POLICY).reason == ADMIT


def test_unknowns_admit():
    # no reports at all, and workers that report no KV capacity: nothing to judge on
    assert decide(req(), [], [], 0, POLICY).admitted
    assert decide(req(), [prefill()], [decode(capacity=0)], 0, POLICY).admitted
    # a queue but no measured throughput yet
    assert decide(req(), [prefill(queued=10**6, rate=0)], [decode()], 0, POLICY).admitted


def test_disabled_admits_everything():
    off = AdmissionPolicy(enabled=False)
    assert decide(req(prompt=10**6), [prefill(queued=10**9, rate=1)], [decode(used=10_000)], 0, off).admitted


def test_kv_full_on_every_worker_rejects_with_retry_after():
    fleet = [decode(0, used=9_900, out_rate=50.0), decode(1, used=9_950, out_rate=50.0)]
    v = decide(req(prompt=100, max_tokens=100), [prefill()], fleet, 0, POLICY)
    assert v.reason == KV_FULL and not v.admitted
    assert "200 tokens" in v.message and "100" in v.message  # what it needs, and the most there is
    # deficit 100 tokens at 100 tokens/s -> 1 s, within the clamp
    assert v.retry_after_s == pytest.approx(1.0)


def test_one_worker_with_room_is_enough():
    fleet = [decode(0, used=9_990), decode(1, used=5_000)]
    assert decide(req(prompt=100, max_tokens=100), [], fleet, 0, POLICY).admitted


def test_prompts_waiting_on_a_worker_and_the_reserve_count_against_its_room():
    w = decode(used=5_000, queued=4_850)
    assert kv_room(w, 0.0) == 150
    assert decide(req(prompt=100, max_tokens=100), [], [w], 0, POLICY).reason == KV_FULL
    assert decide(req(prompt=50, max_tokens=100), [], [w], 0, POLICY).admitted
    reserved = AdmissionPolicy(ttft_slo_s=2.0, kv_reserve_fraction=0.05)
    assert kv_room(w, 0.05) == 150 - 500
    assert decide(req(prompt=50, max_tokens=100), [], [w], 0, reserved).reason == KV_FULL


def test_draining_workers_do_not_count():
    fleet = [decode(0, used=0, draining=True), decode(1, used=10_000)]
    assert decide(req(), [], fleet, 0, POLICY).reason == KV_FULL


def test_request_larger_than_any_worker_is_too_large_not_overload():
    v = decide(req(prompt=6_000, max_tokens=5_000), [], [decode(capacity=10_000)], 0, POLICY)
    assert v.reason == TOO_LARGE and "10000" in v.message and v.retry_after_s is None


def test_retry_after_is_clamped():
    v = decide(req(max_tokens=9_000), [], [decode(used=9_000, out_rate=0.0)], 0, POLICY)
    assert v.reason == KV_FULL and v.retry_after_s == POLICY.max_retry_after_s
    v = decide(req(), [], [decode(used=9_900, out_rate=1e6)], 0, POLICY)
    assert v.retry_after_s == POLICY.min_retry_after_s


def test_estimated_wait_uses_backlogged_throughput_only():
    # the idle worker's low rate says how little arrived, not how much it can do
    busy, idle = prefill(0, queued=1_000, rate=500.0), prefill(1, queued=0, rate=5.0)
    assert estimated_wait_s([busy, idle], [], 0, 0) == pytest.approx(2.0)
    assert estimated_wait_s([busy], [decode(queued=500)], 0, 500) == pytest.approx(4.0)
    assert estimated_wait_s([prefill()], [], 0, 100) == 0.0  # nothing ahead: no wait


def test_gateway_own_queue_counts_when_reports_are_stale():
    busy = prefill(queued=100, rate=100.0)
    assert estimated_wait_s([busy], [], 900, 0) == pytest.approx(9.0)  # max(100 reported, 900 local)
    assert estimated_wait_s([busy], [], 50, 0) == pytest.approx(1.0)


def test_deadline_miss_against_the_slo_rejects():
    slow = [prefill(queued=1_000, rate=250.0)]  # (1000 + 100) / 250 = 4.4 s > 2 s SLO
    v = decide(req(prompt=100), slow, [decode()], 0, POLICY)
    assert v.reason == SLO and "TTFT SLO" in v.message
    assert v.estimated_wait_s == pytest.approx(4.4)
    assert v.retry_after_s == pytest.approx(2.4)
    assert decide(req(prompt=100), [prefill(queued=300, rate=250.0)], [decode()], 0, POLICY).admitted


def test_a_short_request_deadline_tightens_the_budget():
    fleet = [prefill(queued=150, rate=250.0)]  # (150 + 100) / 250 = 1 s: fine for the 2 s SLO
    assert decide(req(prompt=100, deadline=10.0), fleet, [decode()], 0, POLICY).admitted
    v = decide(req(prompt=100, deadline=0.5), fleet, [decode()], 0, POLICY)
    assert v.reason == SLO and "request deadline" in v.message


def test_kv_is_judged_before_the_deadline():
    v = decide(req(), [prefill(queued=10_000, rate=10.0)], [decode(used=10_000)], 0, POLICY)
    assert v.reason == KV_FULL


@pytest.mark.parametrize("kwargs", [{"ttft_slo_s": 0}, {"kv_reserve_fraction": 1.0},
                                    {"min_retry_after_s": 5, "max_retry_after_s": 1}])
def test_policy_validation(kwargs):
    with pytest.raises(ValueError):
        AdmissionPolicy(**kwargs)
