"""Worker registration with a heartbeat TTL (services/common/registry.py) against the real store."""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import pytest

from services.common import keys
from services.common.load_report import LoadReport
from services.common.registry import WorkerDirectory, WorkerRegistration
from services.common.runtime_config import RuntimeConfig
from services.common.store import connect
from services.engine.profile import ServiceTimeModel

TTL_S = 0.5
INTERVAL_S = 0.1


@pytest.fixture
async def store(store_url):
    client = connect(store_url)
    yield client
    await client.aclose()


@pytest.fixture
def prefix():
    return f"test-registry-{uuid.uuid4().hex}"


def _report(worker_id: str, stage: str = "decode", **changes) -> LoadReport:
    values = dict(
        worker_id=worker_id, stage=stage, address=f"10.0.0.1:{5000 + len(worker_id)}", host_id="host/boot",
        model="tiny", timestamp_unix=1_700_000_000.5, queue_len=3, queued_tokens=120, running_seqs=5,
        kv_used_tokens=900, kv_capacity_tokens=4096, output_tokens_per_s=88.5, step_ms_p50=4.25,
        step_ms_p95=9.5, gpu_share=0.5, device="cpu",
        config=RuntimeConfig(max_batch_size=16, max_concurrency=24, local_prefill_threshold=8, version=3),
    )
    values.update(changes)
    return LoadReport(**values)


def _registration(store, prefix, report_fn):
    return WorkerRegistration(store, prefix, report_fn, interval_s=INTERVAL_S, ttl_s=TTL_S)


async def _wait_until(predicate, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if await predicate():
            return time.monotonic() - start
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout} s")


async def test_registered_worker_appears_with_report_intact(store, prefix):
    report = _report("w-decode")
    reg = _registration(store, prefix, lambda: report)
    directory = WorkerDirectory(store, prefix)
    assert await directory.workers("decode") == []
    await reg.start()
    try:
        workers = await directory.workers("decode")
        assert workers == [report]
        got = workers[0]
        assert got.config == report.config
        assert got.kv_free_tokens == 4096 - 900
        assert math.isinf(got.oldest_deadline_slack_s)
        assert await directory.workers("prefill") == []
    finally:
        await reg.stop()


async def test_stop_leaves_at_once(store, prefix):
    reg = _registration(store, prefix, lambda: _report("w1"))
    other = _registration(store, prefix, lambda: _report("w2"))
    directory = WorkerDirectory(store, prefix)
    await reg.start()
    await other.start()
    try:
        assert {w.worker_id for w in await directory.workers("decode")} == {"w1", "w2"}
        await reg.stop()
        assert [w.worker_id for w in await directory.workers("decode")] == ["w2"]
        assert await store.smembers(keys.stage_workers(prefix, "decode")) == {b"w2"}
        assert await store.exists(keys.worker_report(prefix, "w1")) == 0
    finally:
        await other.stop()
    assert await directory.workers("decode") == []


async def test_heartbeat_keeps_worker_alive_and_report_fresh(store, prefix):
    beats = []

    def report():
        beats.append(time.monotonic())
        return _report("w-live", queue_len=len(beats))

    reg = _registration(store, prefix, report)
    directory = WorkerDirectory(store, prefix)
    await reg.start()
    try:
        await asyncio.sleep(2.5 * TTL_S)  # well beyond one TTL: only heartbeats keep the key
        published = len(beats)
        workers = await directory.workers("decode")
        assert [w.worker_id for w in workers] == ["w-live"]
        assert published >= 6
        assert workers[0].queue_len >= published - 1  # a recent report, not the first
        ttl_ms = await store.pttl(keys.worker_report(prefix, "w-live"))
        assert 0 < ttl_ms <= TTL_S * 1000
    finally:
        await reg.stop()


async def test_crashed_worker_expires_after_ttl_and_is_pruned(store, prefix):
    crashed = _registration(store, prefix, lambda: _report("w-crash"))
    alive = _registration(store, prefix, lambda: _report("w-alive"))
    directory = WorkerDirectory(store, prefix)
    await crashed.start()
    await alive.start()
    try:
        await asyncio.sleep(2 * INTERVAL_S)
        crashed._task.cancel()  # a crash: the heartbeat stops, nothing deregisters
        await asyncio.gather(crashed._task, return_exceptions=True)
        t0 = time.monotonic()
        assert {w.worker_id for w in await directory.workers("decode")} == {"w-crash", "w-alive"}

        async def gone():
            return [w.worker_id for w in await directory.workers("decode")] == ["w-alive"]

        await _wait_until(gone, timeout=TTL_S + 1.5)
        elapsed = time.monotonic() - t0
        assert elapsed <= TTL_S + 1.5
        # pruned from the stage set by the directory read, not just hidden
        assert await store.smembers(keys.stage_workers(prefix, "decode")) == {b"w-alive"}
    finally:
        await alive.stop()


async def test_worker_expires_no_sooner_than_its_last_beat_allows(store, prefix):
    reg = _registration(store, prefix, lambda: _report("w-ttl"))
    directory = WorkerDirectory(store, prefix)
    await reg.start()
    reg._task.cancel()
    await asyncio.gather(reg._task, return_exceptions=True)
    start = time.monotonic()
    await asyncio.sleep(TTL_S * 0.5)
    assert [w.worker_id for w in await directory.workers("decode")] == ["w-ttl"]

    async def gone():
        return await directory.workers("decode") == []

    await _wait_until(gone, timeout=2.0)
    assert time.monotonic() - start >= TTL_S * 0.5
    assert await store.smembers(keys.stage_workers(prefix, "decode")) == set()


async def test_stages_are_separate(store, prefix):
    dec = _registration(store, prefix, lambda: _report("d1", stage="decode"))
    pre = _registration(store, prefix, lambda: _report("p1", stage="prefill"))
    directory = WorkerDirectory(store, prefix)
    await dec.start()
    await pre.start()
    try:
        assert [w.worker_id for w in await directory.workers("decode")] == ["d1"]
        assert [w.worker_id for w in await directory.workers("prefill")] == ["p1"]
        other = WorkerDirectory(store, prefix + "-other")  # another deployment sharing the store
        assert await other.workers("decode") == []
    finally:
        await dec.stop()
        await pre.stop()


def test_load_report_round_trip_with_config_and_inf_slack():
    report = _report("w-bytes", prompt_tokens_per_s=1234.5, draining=True, ttft_ms_p95=81.0, itl_ms_p95=12.5)
    assert math.isinf(report.oldest_deadline_slack_s)
    back = LoadReport.from_bytes(report.to_bytes())
    assert back == report
    assert back.config == RuntimeConfig(16, 24, 0, 8, 3)
    assert math.isinf(back.oldest_deadline_slack_s) and back.oldest_deadline_slack_s > 0
    assert back.draining is True


def test_load_report_round_trip_without_config_and_finite_slack():
    report = LoadReport(
        worker_id="w", stage="prefill", address="a:1", host_id="h", model="m", timestamp_unix=5.0,
        oldest_deadline_slack_s=2.5, queue_len=7,
    )
    back = LoadReport.from_bytes(report.to_bytes())
    assert back == report
    assert back.config is None
    assert back.oldest_deadline_slack_s == 2.5
    assert back.kv_free_tokens == 0


async def test_heartbeats_register_again_after_the_store_lost_everything(store, prefix):
    reg = _registration(store, prefix, lambda: _report("w-back", timestamp_unix=time.time()))
    directory = WorkerDirectory(store, prefix)
    await reg.start()
    try:
        # what a restarted, empty store looks like to the worker
        await store.delete(keys.worker_report(prefix, "w-back"), keys.stage_workers(prefix, "decode"))
        assert await directory.workers("decode") == []

        async def back():
            return [w.worker_id for w in await directory.workers("decode")] == ["w-back"]

        await _wait_until(back, timeout=3 * INTERVAL_S + 1.0)
    finally:
        await reg.stop()


async def test_router_directory_holds_fresh_workers_missing_from_the_store(store, prefix):
    fresh = _registration(store, prefix, lambda: _report("w-fresh", timestamp_unix=time.time()))
    leaving = _registration(store, prefix, lambda: _report("w-leaving", timestamp_unix=time.time(), draining=True))
    router = WorkerDirectory(store, prefix, hold_s=TTL_S)
    plain = WorkerDirectory(store, prefix)
    for r in (fresh, leaving):
        await r.publish()
    assert {w.worker_id for w in await router.workers("decode")} == {"w-fresh", "w-leaving"}
    await store.delete(keys.stage_workers(prefix, "decode"), keys.worker_report(prefix, "w-fresh"),
                       keys.worker_report(prefix, "w-leaving"))
    assert await plain.workers("decode") == []
    # the fresh worker stays routable (its report is younger than hold_s); a draining one is never held
    assert [w.worker_id for w in await router.workers("decode")] == ["w-fresh"]
    await asyncio.sleep(TTL_S + 0.1)
    assert await router.workers("decode") == []  # no heartbeat came back: it leaves like an expired key


async def test_router_directory_does_not_hold_a_stale_report(store, prefix):
    stale = _registration(store, prefix, lambda: _report("w-stale", timestamp_unix=time.time() - 10 * TTL_S))
    router = WorkerDirectory(store, prefix, hold_s=TTL_S)
    await stale.publish()
    assert [w.worker_id for w in await router.workers("decode")] == ["w-stale"]
    await stale.stop()
    assert await router.workers("decode") == []


async def test_decode_step_time_fit_travels_through_the_store(store, prefix):
    fit = ServiceTimeModel(base_ms=3.5, per_decode_ms=0.25, per_prefill_ms=0.05, per_context_ms=0.001, samples=812)
    report = _report("w-fit", step_model=fit)
    reg = _registration(store, prefix, lambda: report)
    await reg.start()
    try:
        (got,) = await WorkerDirectory(store, prefix).workers("decode")
        assert got.step_model == fit
        assert got.step_model.predict(32, 0, 4000) == fit.predict(32, 0, 4000)
    finally:
        await reg.stop()
    assert LoadReport.from_bytes(_report("w-none").to_bytes()).step_model is None  # unset until fitted
