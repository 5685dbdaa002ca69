"""The Admin gRPC service and the standard health service of a live decode worker."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import openai
import pytest
import pytest_asyncio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.load_report import LoadReport
from services.proto import inference_pb2 as pb
from services.proto import inference_pb2_grpc as pb_grpc
from tests.stack import start_stack

pytestmark = pytest.mark.asyncio(loop_scope="module")

KV_SLOTS = 32  # what tests/stack.py gives every decode worker
INITIAL_BATCH = 6
THRESHOLD = 3


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(store_url, tiny_model):
    threads = torch.get_num_threads()  # the workers below set one intra-op thread for this process
    s = await start_stack(
        store_url, tiny_model,
        decode_overrides={"max_batch_size": INITIAL_BATCH, "local_prefill_threshold": THRESHOLD, "threads": 1},
        prefill_overrides={"threads": 1},
    )
    yield s
    await s.stop()
    torch.set_num_threads(threads)


@pytest_asyncio.fixture(loop_scope="module")
async def admin(stack):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.decode[0].port}")
    yield pb_grpc.AdminStub(channel), channel
    await channel.close()


def _client(stack) -> openai.AsyncOpenAI:
    return stack.openai(timeout=60)


async def _stream_tokens(client, prompt: str, max_tokens: int) -> tuple[list[int], str | None]:
    stream = await client.completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    ids, finish = [], None
    async for chunk in stream:
        if not chunk.choices:
            continue
        ids.extend(chunk.choices[0].model_extra.get("token_ids") or [])
        finish = chunk.choices[0].finish_reason or finish
    return ids, finish


async def test_get_config_returns_configured_values(admin):
    stub, _ = admin
    cfg = await stub.GetConfig(pb.Empty())
    assert cfg.max_batch_size == INITIAL_BATCH
    assert cfg.max_concurrency == KV_SLOTS
    assert cfg.local_prefill_threshold == THRESHOLD
    assert cfg.version == 0


async def test_set_config_changes_batch_size_and_scheduler_uses_it(stack, admin):
    stub, _ = admin
    worker = stack.decode[0]
    engine = worker.engine
    before = await stub.GetConfig(pb.Empty())
    reply = await stub.SetConfig(pb.RuntimeConfig(max_batch_size=2))
    assert reply.max_batch_size == 2
    assert reply.version == before.version + 1
    assert reply.max_concurrency == before.max_concurrency  # 0 fields stay as they were
    assert reply.local_prefill_threshold == before.local_prefill_threshold
    again = await stub.GetConfig(pb.Empty())
    assert (again.max_batch_size, again.version) == (2, before.version + 1)
    assert engine.scheduler.max_batch_size == 2
    # the running engine steps at most two sequences at once from now on
    first_step = len(engine.profile)
    client = _client(stack)
    results = await asyncio.gather(*(_stream_tokens(client, f"batch cap {i} " * (i + 1), 12) for i in range(5)))
    assert all(len(ids) == 12 and finish == "length" for ids, finish in results)
    batches = [s.batch_size for s in engine.profile.records()[first_step:]]
    assert batches and max(batches) == 2
    # back to the configured size for the other tests
    restored = await stub.SetConfig(pb.RuntimeConfig(max_batch_size=INITIAL_BATCH))
    assert restored.version == before.version + 2
    assert engine.scheduler.max_batch_size == INITIAL_BATCH


async def test_set_config_over_kv_slots_is_invalid_argument(stack, admin):
    stub, _ = admin
    before = await stub.GetConfig(pb.Empty())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SetConfig(pb.RuntimeConfig(max_concurrency=KV_SLOTS + 1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(KV_SLOTS) in info.value.details()
    assert "max_concurrency" in info.value.details()
    after = await stub.GetConfig(pb.Empty())
    assert after == before  # nothing applied, version unchanged
    # the limit itself is allowed
    ok = await stub.SetConfig(pb.RuntimeConfig(max_concurrency=KV_SLOTS))
    assert ok.max_concurrency == KV_SLOTS and ok.version == before.version + 1


async def test_get_load_reports_decode_stage(stack, admin):
    stub, _ = admin
    worker = stack.decode[0]
    report = await stub.GetLoad(pb.Empty())
    assert report.stage == "decode"
    assert report.worker_id == worker.config.worker_id
    assert report.address == f"127.0.0.1:{worker.port}"
    assert report.kv_capacity_tokens > 0
    assert report.kv_capacity_tokens == worker.engine.kv.capacity_tokens  # the paged block pool
    assert 0 <= report.kv_used_tokens <= report.kv_capacity_tokens
    assert report.config.max_batch_size == worker.runtime.max_batch_size
    assert report.draining is False


async def test_health_service_reports_serving(admin):
    _, channel = admin
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def test_batch_size_swap_while_streaming_keeps_tokens(stack, admin):
    stub, _ = admin
    engine = stack.decode[0].engine
    await stub.SetConfig(pb.RuntimeConfig(max_batch_size=8))
    client = _client(stack)
    prompts = [f"Swap {i}: the batch shrinks and grows " + "again " * (i * 2) for i in range(8)]

    baseline = await asyncio.gather(*(_stream_tokens(client, p, 40) for p in prompts))
    assert all(len(ids) == 40 and finish == "length" for ids, finish in baseline)

    tasks = [asyncio.create_task(_stream_tokens(client, p, 40)) for p in prompts]
    await _wait_for(lambda: len(engine.scheduler.running) == 8 or any(t.done() for t in tasks))
    assert not all(t.done() for t in tasks), "requests finished before the swap"

    assert (await stub.SetConfig(pb.RuntimeConfig(max_batch_size=1))).max_batch_size == 1
    mark = len(engine.profile)
    await _wait_for(lambda: len(engine.profile) >= mark + 10 or all(t.done() for t in tasks))
    before_grow = len(engine.profile)
    assert not all(t.done() for t in tasks), "the swap back should happen mid-stream"
    assert (await stub.SetConfig(pb.RuntimeConfig(max_batch_size=8))).max_batch_size == 8
    restored = len(engine.profile)

    results = await asyncio.gather(*tasks)
    assert results == baseline
    steps = engine.profile.records()
    during = [s.batch_size for s in steps[mark + 1 : before_grow]]
    after = [s.batch_size for s in steps[restored + 1 :]]
    assert during and set(during) == {1}
    assert after and max(after) > 1
    assert (await stub.GetConfig(pb.Empty())).max_batch_size == 8


async def test_get_load_carries_the_step_time_fit_and_it_follows_new_steps(stack, admin):
    stub, _ = admin
    engine = stack.decode[0].engine
    client = _client(stack)
    await asyncio.gather(*(_stream_tokens(client, f"Fit {i}: " + "more words " * i, 12) for i in range(6)))
    deadline = time.monotonic() + 20
    while not (report := await stub.GetLoad(pb.Empty())).HasField("step_model"):
        assert time.monotonic() < deadline, "no step-time fit after serving requests"
        await asyncio.sleep(0.2)
    first = report.step_model
    assert 0 < first.samples <= len(engine.profile)
    values = (first.base_ms, first.per_decode_ms, first.per_prefill_ms, first.per_context_ms)
    assert all(math.isfinite(x) for x in values) and any(x != 0 for x in values)
    # the same fit reaches the store (the tuner and the scaler read it there)
    assert LoadReport.from_bytes(report.SerializeToString()).step_model.samples == first.samples

    await asyncio.gather(*(_stream_tokens(client, f"Refit {i}: " + "other words " * i, 16) for i in range(6)))
    deadline = time.monotonic() + 20
    while (report := await stub.GetLoad(pb.Empty())).step_model == first:
        assert time.monotonic() < deadline, "the fit did not follow the new steps"
        await asyncio.sleep(0.2)
    assert report.step_model.samples >= first.samples  # a newer fit (a full ring keeps its size)
