"""Checkpointed controller state: one decision per interval across replicas, and restarts that continue."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from services.common import keys
from services.common.load_report import LoadReport
from services.common.registry import WorkerRegistration
from services.proto import externalscaler_pb2 as pb
from services.proto import externalscaler_pb2_grpc as pb_grpc
from services.scaler.checkpoint import CheckpointStore, Commit, DecisionRecord
from services.scaler.config import ScalerConfig
from services.scaler.metadata import parse_trigger
from services.scaler.policy import decide
from services.scaler.server import ScalerService
from services.scaler.signal_source import SignalSource
from services.scaler.signals import ControllerState, Decision

from tests.scaler.conftest import T0, FakeClock


async def start(store_url: str, clock: FakeClock) -> tuple[ScalerService, grpc.aio.Channel, pb_grpc.ExternalScalerStub]:
    service = ScalerService(ScalerConfig(port=0, store_url=store_url, signal_max_age_s=0.0), clock=clock)
    await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    return service, channel, pb_grpc.ExternalScalerStub(channel)


async def stop(service: ScalerService, channel: grpc.aio.Channel) -> None:
    await channel.close()
    await service.stop(grace_s=0.5)


async def publish_decode(store, prefix: str, pods: int, output_per_pod: float) -> None:
    for i in range(pods):
        r = LoadReport(worker_id=f"d{i}", stage="decode", address="127.0.0.1:1", host_id="h", model="tiny",
                       timestamp_unix=time.time(), output_tokens_per_s=output_per_pod)
        await WorkerRegistration(store, prefix, lambda r=r: r, ttl_s=60.0).publish()


def request(meta: dict[str, str]) -> pb.GetMetricsRequest:
    scaled = pb.ScaledObjectRef(name="so", namespace="ns", scalerMetadata=meta)
    return pb.GetMetricsRequest(scaledObjectRef=scaled, metricName="decode-desired-replicas")


def record(version: int, value: float, at: float = T0) -> DecisionRecord:
    return DecisionRecord(version, "desired", at, value, Decision(int(value), "token_rate"), ControllerState(last_desired=int(value)))


async def test_compare_and_set_lets_one_writer_win(store, prefix) -> None:
    checkpoints = CheckpointStore(store, ttl_s=60.0)
    key = keys.scaler_checkpoint(prefix, "ns", "so", "decode")
    assert await checkpoints.load(key) == (0, None)
    assert await checkpoints.commit(key, 0, record(1, 3.0)) == Commit(record(1, 3.0), True)
    late = await checkpoints.commit(key, 0, record(1, 5.0))  # decided from the same version, committed second
    assert late == Commit(record(1, 3.0), False)
    assert await checkpoints.load(key) == (1, record(1, 3.0))
    assert 0 < await store.pttl(key) <= 60_000
    with pytest.raises(ValueError):
        await checkpoints.commit(key, 1, record(3, 4.0))


async def test_unreadable_record_is_replaced(store, prefix) -> None:
    checkpoints = CheckpointStore(store, ttl_s=60.0)
    key = keys.scaler_checkpoint(prefix, "ns", "so", "decode")
    await store.hset(key, mapping={"version": "7", "record": "{not json"})
    assert await checkpoints.load(key) == (7, None)
    assert (await checkpoints.commit(key, 7, record(8, 2.0))).won


async def test_racing_replicas_take_one_decision_and_the_loser_answers_the_winners(store_url, store, prefix) -> None:
    clock = FakeClock()
    a, channel_a, stub_a = await start(store_url, clock)
    b, channel_b, stub_b = await start(store_url, clock)
    try:
        meta = {"stage": "decode", "storePrefix": prefix}
        await publish_decode(store, prefix, pods=2, output_per_pod=1200.0)  # needs 3
        b_ready, a_done = asyncio.Event(), asyncio.Event()
        attempted: list[DecisionRecord] = []
        real_commit = b.checkpoints.commit

        async def commit_after_a(key: str, expected: int, rec: DecisionRecord) -> Commit:
            attempted.append(rec)
            b_ready.set()
            await a_done.wait()
            return await real_commit(key, expected, rec)

        b.checkpoints.commit = commit_after_a
        call_b = asyncio.ensure_future(stub_b.GetMetrics(request(meta)))
        await b_ready.wait()  # b decided 3 from version 0 and waits to commit
        await publish_decode(store, prefix, pods=2, output_per_pod=2000.0)  # now needs 5
        answer_a = await stub_a.GetMetrics(request(meta))
        a_done.set()
        answer_b = await call_b
        assert attempted[0].value == 3.0 and answer_a.metricValues[0].metricValueFloat == 5.0
        assert answer_b.metricValues[0].metricValueFloat == 5.0  # the winner's decision
        assert (await b.checkpoints.load(keys.scaler_checkpoint(prefix, "ns", "so", "decode")))[0] == 1
        assert b.metrics.registry.get_sample_value("elastune_scaler_decision_conflicts_total", {"stage": "decode"}) == 1
        assert b.metrics.registry.get_sample_value("elastune_scaler_decisions_total", {"stage": "decode", "reason": "token_rate"}) is None

        b.checkpoints.commit = real_commit
        clock.now += 10.0  # the decision is stale: many callers on both replicas at once
        answers = await asyncio.gather(*(stub.GetMetrics(request(meta)) for stub in (stub_a, stub_b) * 20))
        assert {r.metricValues[0].metricValueFloat for r in answers} == {5.0}
        assert (await a.checkpoints.load(keys.scaler_checkpoint(prefix, "ns", "so", "decode")))[0] == 2
        total = sum(
            s.metrics.registry.get_sample_value("elastune_scaler_decisions_total", {"stage": "decode", "reason": reason}) or 0
            for s in (a, b) for reason in ("token_rate", "hold_steady")
        )
        assert total == 2  # one per interval, whoever took it
    finally:
        await stop(a, channel_a)
        await stop(b, channel_b)


async def test_restarted_scaler_continues_from_the_stored_state(store_url, store, prefix) -> None:
    clock = FakeClock()
    meta = {"stage": "decode", "storePrefix": prefix, "emaHalfLifeSeconds": "60"}
    key = keys.scaler_checkpoint(prefix, "ns", "so", "decode")
    first, channel, stub = await start(store_url, clock)
    await publish_decode(store, prefix, pods=4, output_per_pod=800.0)  # 3200 tokens/s: 4 pods at 800 usable
    for _ in range(3):
        assert (await stub.GetMetrics(request(meta))).metricValues[0].metricValueFloat == 4.0
        clock.now += 10.0
    await publish_decode(store, prefix, pods=4, output_per_pod=100.0)  # load drops to half a pod
    assert (await stub.GetMetrics(request(meta))).metricValues[0].metricValueFloat == 4.0
    await stop(first, channel)  # mid-run

    clock.now += 10.0
    second, channel, stub = await start(store_url, clock)
    try:
        version, stored = await CheckpointStore(store, 60.0).load(key)
        assert version == 4 and stored is not None
        signals = (await SignalSource(store).read(prefix, "decode", clock.now)).signals
        policy = parse_trigger(meta).policy
        expected, _ = decide(signals, policy, stored.state)
        from_scratch, _ = decide(signals, policy, ControllerState())
        assert expected.desired == 4 and from_scratch.desired == 3  # the state matters here
        answer = await stub.GetMetrics(request(meta))
        assert answer.metricValues[0].metricValueFloat == expected.desired
        version, latest = await second.checkpoints.load(key)
        assert version == 5 and latest is not None and latest.decision == expected
    finally:
        await stop(second, channel)
