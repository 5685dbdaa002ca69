"""`elastune drain --address`, the preStop hook of the worker pods: a real worker drains through its
Admin RPC while streams run, and routers see it leave; errors are exit codes with a message."""

from __future__ import annotations

import asyncio
import sys

import pytest

from services.common.registry import WorkerDirectory
from services.common.store import connect
from tests.stack import start_stack


@pytest.fixture
async def stack(store_url, tiny_model):
    s = await start_stack(store_url, tiny_model, prefill=1, decode=2)
    yield s
    await s.stop()


async def cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode, out.decode()


async def test_drain_command_drains_a_decode_worker_without_losing_tokens(stack, store_url):
    client = stack.openai(timeout=60)

    async def one(i: int) -> list[int]:
        tokens = []
        async for chunk in await client.completions.create(
            model="tiny", prompt=f"drain me {i} " * (i + 1), max_tokens=60, temperature=0, stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        ):
            tokens.extend(chunk.choices[0].model_extra["token_ids"])
        return tokens

    expected = await asyncio.gather(*(one(i) for i in range(6)))
    leaving, staying = stack.decode
    leaving.engine.scheduler.max_batch_size = 1  # slow, so sequences are mid-flight when the hook runs

    async def hook() -> tuple[int, str]:
        while not leaving.sequences:
            await asyncio.sleep(0.01)
        return await cli("drain", "--address", leaving.address, "--grace", "30")

    *got, (code, out) = await asyncio.gather(*(one(i) for i in range(6)), hook())
    assert got == expected
    assert code == 0 and f"drained {leaving.address}: 0 sequences" in out
    assert leaving.draining and leaving.engine.slots.used == 0
    r = connect(store_url)
    try:
        reports = await WorkerDirectory(r, leaving.config.store_prefix).workers("decode")
    finally:
        await r.aclose()
    assert {w.worker_id: w.draining for w in reports}[leaving.config.worker_id] is True
    stack.decode = [staying]
    await leaving.stop(1.0)


async def test_drain_command_reports_an_unreachable_worker():
    from services.launcher import free_port

    code, out = await cli("drain", "--address", f"127.0.0.1:{free_port()}", "--grace", "1")
    assert code == 2 and "UNAVAILABLE" in out
