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
    kv_room,
    prefill_wait_s,
    summarize,
)
from services.common.runtime_config import RuntimeConfig

POLICY = AdmissionPolicy(ttft_slo_s=2.0, kv_reserve_fraction=0.0, min_retry_after_s=1.0, max_retry_after_s=30.0)


def decode(i=0, used=0, capacity=10_000, queued=0, out_rate=0.0, draining=False) -> LoadReport:
    return LoadReport(f"d{i}", "decode", f"d{i}:1", "h", "m", 0.0, queued_tokens=queued, kv_used_tokens=used,
                      kv_capacity_tokens=capacity, output_tokens_per_s=out_rate, draining=draining)


def prefill(i=0, queued=0, rate=0.0, prompts=None, batch_ms=0.0, max_batch=8, draining=False) -> LoadReport:
    prompts = (queued + 99) // 100 if prompts is None else prompts  # 100-token prompts unless told
    return LoadReport(f"p{i}", "prefill", f"p{i}:1", "h", "m", 0.0, queue_len=prompts, queued_tokens=queued,
                      prompt_tokens_per_s=rate, step_ms_p50=batch_ms, draining=draining,
                      config=RuntimeConfig(max_batch_size=max_batch, max_concurrency=256))


def decide(request, prefill, decode_, policy):
    return decide_on_view(request, summarize(prefill, decode_, policy), policy)


def req(prompt=100, max_tokens=100, deadline=60.0) -> AdmissionRequest:
    return AdmissionRequest(prompt, max_tokens, deadline)


def test_idle_fleet_admits():
    assert decide(req(), [prefill()], [decode()], POLICY).reason == ADMIT


def test_unknowns_admit():
    # no reports at all, and workers that report no KV capacity: nothing to judge on
    assert decide(req(), [], [], POLICY).admitted
    assert decide(req(), [prefill()], [decode(capacity=0)], POLICY).admitted
    # a queue but no measured throughput yet
    assert decide(req(), [prefill(queued=10**6, rate=0)], [decode()], POLICY).admitted


def test_disabled_admits_everything():
    off = AdmissionPolicy(enabled=False)
    assert decide(req(prompt=10**6), [prefill(queued=10**9, rate=1)], [decode(used=10_000)], off).admitted


def test_kv_full_on_every_worker_rejects_with_retry_after():
    fleet = [decode(0, used=9_900, out_rate=50.0), decode(1, used=9_950, out_rate=50.0)]
    v = decide(req(prompt=100, max_tokens=100), [prefill()], fleet, POLICY)
    assert v.reason == KV_FULL and not v.admitted
    assert "200 tokens" in v.message and "100" in v.message  # what it needs, and the most there is
    # deficit 100 tokens at 100 tokens/s -> 1 s, within the clamp
    assert v.retry_after_s == pytest.approx(1.0)


def test_one_worker_with_room_is_enough():
    fleet = [decode(0, used=9_990), decode(1, used=5_000)]
    assert decide(req(prompt=100, max_tokens=100), [], fleet, POLICY).admitted


def test_prompts_waiting_on_a_worker_and_the_reserve_count_against_its_room():
    w = decode(used=5_000, queued=4_850)
    assert kv_room(w, 0.0) == 150
    assert decide(req(prompt=100, max_tokens=100), [], [w], POLICY).reason == KV_FULL
    assert decide(req(prompt=50, max_tokens=100), [], [w], POLICY).admitted
    reserved = AdmissionPolicy(ttft_slo_s=2.0, kv_reserve_fraction=0.05)
    assert kv_room(w, 0.05) == 150 - 500
    assert decide(req(prompt=50, max_tokens=100), [], [w], reserved).reason == KV_FULL


def test_draining_workers_do_not_count():
    fleet = [decode(0, used=0, draining=True), decode(1, used=10_000)]
    assert decide(req(), [], fleet, POLICY).reason == KV_FULL


def test_request_larger_than_any_worker_is_too_large_not_overload():
    v = decide(req(prompt=6_000, max_tokens=5_000), [], [decode(capacity=10_000)], POLICY)
    assert v.reason == TOO_LARGE and "10000" in v.message and v.retry_after_s is None


def test_retry_after_is_clamped():
    v = decide(req(max_tokens=9_000), [], [decode(used=9_000, out_rate=0.0)], POLICY)
    assert v.reason == KV_FULL and v.retry_after_s == POLICY.max_retry_after_s
    v = decide(req(), [], [decode(used=9_900, out_rate=1e6)], POLICY)
    assert v.retry_after_s == POLICY.min_retry_after_s


def test_prefill_wait_takes_the_smaller_of_two_estimates():
    # 2,000 tokens queued at 500 tokens/s: 4 s; 20 prompts in batches of 8 at 0.5 s: 1.5 s
    w = prefill(queued=2_000, rate=500.0, prompts=20, batch_ms=500)
    assert prefill_wait_s(w) == pytest.approx(1.5)
    # after an idle spell the 5 s rate lags: the batch count is the better guess, and vice versa
    assert prefill_wait_s(prefill(queued=2_000, rate=10.0, prompts=20, batch_ms=500)) == pytest.approx(1.5)
    assert prefill_wait_s(prefill(queued=2_000, rate=2_000.0, prompts=20, batch_ms=5_000)) == pytest.approx(1.0)
    assert prefill_wait_s(prefill(queued=2_000)) is None  # nothing measured yet
    assert prefill_wait_s(prefill(batch_ms=5_000)) == 0.0  # idle: no wait, whatever its batches take


def test_the_least_loaded_worker_sets_the_fleet_wait():
    late = prefill(0, queued=10_000, rate=100.0, prompts=100, batch_ms=1_000)  # min(100, 13 x 1) = 13 s
    soon = prefill(1, queued=100, rate=1_000.0, prompts=1, batch_ms=100)  # min(0.1, 1 x 0.1) = 0.1 s
    assert summarize([late, soon], [], POLICY).first_token_wait_s == pytest.approx(0.1)
    assert summarize([late], [], POLICY).first_token_wait_s == pytest.approx(13.0)
    gone = prefill(1, draining=True, batch_ms=1)
    assert summarize([late, gone], [], POLICY).first_token_wait_s == pytest.approx(13.0)
    assert summarize([], [], POLICY).first_token_wait_s == 0.0  # decode prefills itself


def test_deadline_miss_against_the_slo_rejects():
    slow = [prefill(queued=1_000, rate=250.0, prompts=10, batch_ms=400)]  # min(4 s, 2 x 0.4 s) = 0.8 s
    assert decide(req(), slow, [decode()], POLICY).admitted
    slow = [prefill(queued=10_000, rate=2_500.0, prompts=100, batch_ms=400)]  # min(4 s, 13 x 0.4 s) = 4 s
    v = decide(req(), slow, [decode()], POLICY)
    assert v.reason == SLO and "TTFT SLO" in v.message
    assert v.estimated_wait_s == pytest.approx(4.0)
    assert v.retry_after_s == pytest.approx(2.0)


def test_a_short_request_deadline_tightens_the_budget():
    fleet = [prefill(queued=200, rate=200.0, prompts=2, batch_ms=1_000)]  # min(1 s, 1 x 1 s) = 1 s
    assert decide(req(deadline=10.0), fleet, [decode()], POLICY).admitted
    v = decide(req(deadline=0.5), fleet, [decode()], POLICY)
    assert v.reason == SLO and "request deadline" in v.message


def test_kv_is_judged_before_the_deadline():
    v = decide(req(), [prefill(queued=10_000, rate=10.0, batch_ms=10_000)], [decode(used=10_000)], POLICY)
    assert v.reason == KV_FULL


@pytest.mark.parametrize("kwargs", [{"ttft_slo_s": 0}, {"kv_reserve_fraction": 1.0},
                                    {"min_retry_after_s": 5, "max_retry_after_s": 1}])
def test_policy_validation(kwargs):
    with pytest.raises(ValueError):
        AdmissionPolicy(**kwargs)
