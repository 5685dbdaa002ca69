"""Drain with migration and resume after a lost decode worker: no token lost or repeated."""

from __future__ import annotations

import asyncio

import pytest

from tests.stack import start_stack

PROMPTS = [f"migrating sequence {i} " + "with a context " * (i % 4) for i in range(6)]
MAX_TOKENS = 80


@pytest.fixture
async def stack(store_url, tiny_model):
    s = await start_stack(store_url, tiny_model, prefill=1, decode=2)
    yield s
    await s.stop()


async def run_all(stack, seeded: bool = False) -> list[list[int]]:
    client = stack.openai(timeout=60)

    async def one(i: int) -> list[int]:
        extra = {"return_token_ids": True, "ignore_eos": True}
        stream = await client.completions.create(
            model="tiny", prompt=PROMPTS[i], max_tokens=MAX_TOKENS, stream=True, extra_body=extra,
            **({"temperature": 0.8, "seed": 100 + i} if seeded else {"temperature": 0}),
        )
        tokens = []
        async for chunk in stream:
            tokens.extend(chunk.choices[0].model_extra["token_ids"])
        return tokens

    return await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))


async def wait_running(worker, at_least: int = 1) -> None:
    for _ in range(500):
        if len(worker.sequences) >= at_least and all(s.generated > 3 for s in worker.sequences):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no sequence started on the worker")


@pytest.mark.parametrize("seeded", [False, True])
async def test_drain_migrates_running_sequences_without_losing_tokens(stack, seeded):
    expected = await run_all(stack, seeded)
    assert all(len(t) == MAX_TOKENS for t in expected)
    leaving, staying = stack.decode
    leaving.engine.scheduler.max_batch_size = 1  # slow it down so sequences are mid-flight

    async def drain_when_busy():
        await wait_running(leaving)
        await leaving.stop(10.0)  # SIGTERM path: NOT_SERVING, drain (migrate), stop

    got, _ = await asyncio.gather(run_all(stack, seeded), drain_when_busy())
    assert got == expected
    assert leaving.migrations.sent >= 1
    assert staying.migrations.adopted == leaving.migrations.sent
    assert stack.gateway.pipeline.handovers == leaving.migrations.sent
    assert stack.gateway.pipeline.resumed == 0
    assert leaving.engine.slots.used == 0
    stack.decode = [staying]


async def test_lost_worker_mid_stream_is_resumed_elsewhere(stack):
    expected = await run_all(stack)
    lost, other = stack.decode
    lost.engine.scheduler.max_batch_size = 1

    async def crash_when_busy():
        await wait_running(lost)
        await lost.server.stop(None)  # RPCs cut off at once, as if the process died

    got, _ = await asyncio.gather(run_all(stack), crash_when_busy())
    assert got == expected
    assert lost.migrations.sent == 0  # nothing was handed over: the gateway re-prefilled
    assert stack.gateway.pipeline.resumed >= 1
    assert stack.gateway.pipeline.handovers == 0
