"""The KEDA external scaler against the real store and real gRPC, read the way KEDA and the HPA read it."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest

from services.autoscaler.hpa import HPA, KedaScaledObjectState, MetricTarget, metric_value, target_size
from services.common import keys
from services.common.load_report import LoadReport
from services.common.registry import WorkerRegistration
from services.launcher import free_port
from services.proto import externalscaler_pb2 as pb
from services.proto import externalscaler_pb2_grpc as pb_grpc
from services.scaler.config import ScalerConfig
from services.scaler.server import ScalerService

from tests.scaler.conftest import FakeClock


@asynccontextmanager
async def serving(store_url: str, clock=time.time, **config) -> AsyncIterator[tuple[ScalerService, pb_grpc.ExternalScalerStub]]:
    """A scaler on a free port; each read sees what was just published unless signal_max_age_s is given."""
    config.setdefault("signal_max_age_s", 0.0)
    service = ScalerService(ScalerConfig(port=0, store_url=store_url, **config), clock=clock)
    await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        yield service, pb_grpc.ExternalScalerStub(channel)
    finally:
        await channel.close()
        await service.stop(grace_s=0.5)


def report(worker_id: str, stage: str, **values) -> LoadReport:
    return LoadReport(worker_id=worker_id, stage=stage, address="127.0.0.1:1", host_id="h", model="tiny",
                      timestamp_unix=time.time(), **values)


async def publish(store, prefix: str, *reports: LoadReport) -> None:
    for r in reports:
        await WorkerRegistration(store, prefix, lambda r=r: r, ttl_s=60.0).publish()


def ref(prefix: str, **meta: str) -> pb.ScaledObjectRef:
    return pb.ScaledObjectRef(name="so", namespace="ns", scalerMetadata={"storePrefix": prefix, **meta})


async def spec_of(stub, scaled: pb.ScaledObjectRef) -> pb.MetricSpec:
    specs = (await stub.GetMetricSpec(scaled)).metricSpecs
    assert len(specs) == 1
    return specs[0]


async def value_of(stub, scaled: pb.ScaledObjectRef) -> pb.MetricValue:
    spec = await spec_of(stub, scaled)
    values = (await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=scaled, metricName=spec.metricName))).metricValues
    assert len(values) == 1 and values[0].metricName == spec.metricName
    return values[0]


async def test_metric_spec_shapes_need_no_store() -> None:
    async with serving("redis://127.0.0.1:1/0") as (_, stub):
        spec = await spec_of(stub, ref("p", stage="decode"))
        assert (spec.metricName, spec.targetSizeFloat, spec.targetSize) == ("decode-desired-replicas", 1.0, 1)
        raw = ref("p", stage="prefill", mode="raw", tokensPerSecondPerPod="6.111", targetUtilization="1")
        spec = await spec_of(stub, raw)
        assert (spec.metricName, spec.targetSizeFloat, spec.targetSize) == ("prefill-load-tokens-per-second", 6.111, 6)
        spec = await spec_of(stub, ref("p", stage="experts/g-1", mode="raw"))  # 1000 tokens/s x 0.8
        assert (spec.metricName, spec.targetSizeFloat, spec.targetSize) == ("experts-g-1-load-tokens-per-second", 800.0, 800)
        spec = await spec_of(stub, ref("p", stage="decode", mode="raw", tokensPerSecondPerPod="0.3"))
        assert spec.targetSizeFloat == pytest.approx(0.24) and spec.targetSize == 1  # never a non-positive target

        for call in (stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=raw)), stub.IsActive(raw)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "store" in caught.value.details()


async def test_raw_mode_returns_the_smoothed_load_and_holds_it_for_the_interval(store_url, store, prefix) -> None:
    clock = FakeClock()
    scaled = ref(prefix, stage="prefill", mode="raw", emaHalfLifeSeconds="10", queueDrainSeconds="4")
    async with serving(store_url, clock) as (_, stub):
        await publish(store, prefix, report("p1", "prefill", prompt_tokens_per_s=90.0),
                      report("g1", "gateway", prompt_tokens_per_s=100.0))
        first = await value_of(stub, scaled)
        assert first.metricValueFloat == pytest.approx(100.0)  # the gateway's arrival rate, not the worker's
        await publish(store, prefix, report("g1", "gateway", prompt_tokens_per_s=300.0, queued_tokens=400),
                      report("p1", "prefill", prompt_tokens_per_s=90.0, queued_tokens=300))  # among the gateway's 400
        clock.now += 1.0  # within decisionIntervalSeconds (5): the stored decision
        assert (await value_of(stub, scaled)).metricValueFloat == pytest.approx(100.0)
        clock.now += 9.0  # one half-life after the first sample: halfway to 300, plus 400 queued / 4 s
        second = await value_of(stub, scaled)
        assert second.metricValueFloat == pytest.approx(200.0 + 100.0)
        assert second.metricValue == 300


async def test_desired_mode_returns_the_policy_replicas(store_url, store, prefix) -> None:
    async with serving(store_url) as (service, stub):
        scaled = ref(prefix, stage="decode")  # 1000 tokens/s per pod at 0.8: 800 usable
        await publish(store, prefix, *(report(f"d{i}", "decode", output_tokens_per_s=1200.0) for i in range(2)))
        value = await value_of(stub, scaled)
        assert (value.metricValueFloat, value.metricValue) == (3.0, 3)
        sample = service.metrics.registry.get_sample_value
        assert sample("elastune_scaler_decisions_total", {"stage": "decode", "reason": "token_rate"}) == 1
        labels = {"stage": "decode", "scaled_object": "ns/so"}
        assert sample("elastune_scaler_desired_replicas", labels) == 3
        assert sample("elastune_scaler_current_replicas", labels) == 2


async def test_asked_replicas_not_reporting_are_pending(store_url, store, prefix) -> None:
    async with serving(store_url) as (service, stub):
        await publish(store, prefix, *(report(f"d{i}", "decode", output_tokens_per_s=1600.0) for i in range(2)))
        await store.set(keys.asked_replicas(prefix, "decode"), "4")
        assert (await value_of(stub, ref(prefix, stage="decode"))).metricValueFloat == 4.0
        sample = service.metrics.registry.get_sample_value
        assert sample("elastune_scaler_decisions_total", {"stage": "decode", "reason": "hold_pending"}) == 1
        assert sample("elastune_scaler_pending_replicas", {"stage": "decode", "scaled_object": "ns/so"}) == 2


async def test_metric_name_must_be_this_triggers(store_url, store, prefix) -> None:
    async with serving(store_url) as (_, stub):
        scaled = ref(prefix, stage="decode")
        ok = await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=scaled, metricName="s0-decode-desired-replicas"))
        assert ok.metricValues[0].metricName == "s0-decode-desired-replicas"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=scaled, metricName="prefill-desired-replicas"))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "decode-desired-replicas" in caught.value.details()


async def test_is_active_follows_work_for_each_stage(store_url, store, prefix) -> None:
    async with serving(store_url) as (_, stub):

        async def active(stage: str) -> bool:
            return (await stub.IsActive(ref(prefix, stage=stage))).result

        assert not await active("prefill") and not await active("decode")
        await publish(store, prefix, report("d1", "decode", kv_capacity_tokens=4096), report("g1", "gateway"))
        assert not await active("decode")  # idle worker, idle gateway
        await publish(store, prefix, report("p1", "prefill", queue_len=3, queued_tokens=90, draining=True))
        assert not await active("prefill")  # a draining worker's leftovers do not hold the stage up
        await publish(store, prefix, report("g1", "gateway", running_seqs=2))
        assert await active("decode") and not await active("prefill")  # streaming needs decode only
        await publish(store, prefix, report("g1", "gateway", queue_len=1, queued_tokens=50))
        for stage in ("prefill", "decode", "experts"):  # waiting for a first token: every stage, at zero workers
            assert await active(stage)


async def test_a_worker_that_stops_reporting_stops_counting(store_url, store, prefix) -> None:
    async with serving(store_url) as (_, stub):
        busy = report("d-gone", "decode", running_seqs=4)
        await WorkerRegistration(store, prefix, lambda: busy, ttl_s=0.2).publish()
        assert (await stub.IsActive(ref(prefix, stage="decode"))).result
        await asyncio.sleep(0.4)  # its heartbeat TTL passes
        assert not (await stub.IsActive(ref(prefix, stage="decode"))).result
        assert await store.smembers(keys.stage_workers(prefix, "decode")) == set()  # pruned


async def test_reads_of_a_stage_share_one_store_read_for_max_age(store_url, store, prefix) -> None:
    async with serving(store_url, signal_max_age_s=0.5) as (_, stub):
        scaled = ref(prefix, stage="decode")
        assert not (await stub.IsActive(scaled)).result
        await publish(store, prefix, report("g1", "gateway", queue_len=1, queued_tokens=10))
        assert not (await stub.IsActive(scaled)).result  # the read of a moment ago
        await asyncio.sleep(0.55)
        assert (await stub.IsActive(scaled)).result


async def test_stream_pushes_true_soon_after_work_arrives_and_ends_on_cancel(store_url, store, prefix) -> None:
    async with serving(store_url, signal_max_age_s=ScalerConfig().signal_max_age_s) as (service, stub):
        call = stub.StreamIsActive(ref(prefix, stage="prefill"))
        seen: list[tuple[float, bool]] = []

        async def consume() -> None:
            async for message in call:
                seen.append((time.monotonic(), message.result))

        reader = asyncio.create_task(consume())
        await asyncio.sleep(1.0)
        assert [value for _, value in seen] == [False]  # idle, said once: no repeats within seconds
        arrived = time.monotonic()
        await publish(store, prefix, report("g1", "gateway", queue_len=1, queued_tokens=64))
        while not any(value for _, value in seen) and time.monotonic() - arrived < 2.0:
            await asyncio.sleep(0.01)
        pushed = next(t for t, value in seen if value)
        assert pushed - arrived <= 1.0
        assert service.open_streams == 1
        call.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        for _ in range(100):
            if service.open_streams == 0:
                break
            await asyncio.sleep(0.02)
        assert service.open_streams == 0


async def test_keda_reads_raw_mode_as_expected(store_url, store, prefix) -> None:
    clock = FakeClock()
    async with serving(store_url, clock) as (_, stub):

        async def poll(scaled: pb.ScaledObjectRef, rate: float) -> tuple[MetricTarget, float, bool, pb.MetricValue]:
            await publish(store, prefix, report("g1", "gateway", prompt_tokens_per_s=rate))
            clock.now += 15.0  # a KEDA polling interval, past decisionIntervalSeconds
            spec = await spec_of(stub, scaled)
            value = await value_of(stub, scaled)
            target = MetricTarget("AverageValue", target_size(spec.targetSize, spec.targetSizeFloat))
            active = (await stub.IsActive(scaled)).result
            return target, metric_value(value.metricValue, value.metricValueFloat), active, value

        exact = dict(stage="prefill", mode="raw", targetUtilization="1", emaHalfLifeSeconds="0")
        threshold_10 = ref(prefix, tokensPerSecondPerPod="10", **exact)
        keda = KedaScaledObjectState(min_replica_count=0, max_replica_count=10, cooldown_period_s=60.0)
        replicas = 0
        for rate, expected in ((10.0, 1), (10.0, 1), (20.0, 2)):
            target, value, active, _ = await poll(threshold_10, rate)
            replicas = keda.step(clock.now, active, [(target, value)], replicas)
            assert (value, replicas) == (rate, expected)
        target, value, active, _ = await poll(threshold_10, 0.0)
        assert (value, active) == (0.0, False)
        idle_since = clock.now
        while clock.now - idle_since <= 60.0:
            assert replicas > 0  # not before the cooldown
            replicas = keda.step(clock.now, active, [(target, value)], replicas)
            clock.now += 15.0
        assert keda.step(clock.now, False, [(target, value)], replicas) == 0

        capped = ref(prefix, tokensPerSecondPerPod="6.111", minReplicas="1", maxReplicas="3", **exact)
        target, value, active, raw = await poll(capped, 22.222)
        assert (target.value, value, raw.metricValue) == (6.111, 22.222, 23)
        keda = KedaScaledObjectState(min_replica_count=1, max_replica_count=3)
        assert keda.step(clock.now, active, [(target, value)], 1) == 3

        target, value, _, raw = await poll(threshold_10, 20.0)
        assert metric_value(raw.metricValue, 0.0) == 20.0  # a reader of the deprecated int field alone
        hpa = HPA(min_replicas=1, max_replicas=10)
        for rate, expected in ((21.0, 2), (23.0, 3)):  # within and beyond the 10% tolerance at 2 replicas
            target, value, _, _ = await poll(threshold_10, rate)
            assert hpa.desired(2, [(target, value)], clock.now) == expected


async def test_metrics_are_served_over_http(store_url, store, prefix) -> None:
    port = free_port()
    async with serving(store_url, metrics_port=port, metrics_host="127.0.0.1") as (_, stub):
        await publish(store, prefix, report("d1", "decode", output_tokens_per_s=1200.0))
        assert (await value_of(stub, ref(prefix, stage="decode"))).metricValue == 2
        url = f"http://127.0.0.1:{port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        assert 'elastune_scaler_desired_replicas{scaled_object="ns/so",stage="decode"} 2.0' in body
        assert 'elastune_scaler_decisions_total{reason="token_rate",stage="decode"} 1.0' in body
