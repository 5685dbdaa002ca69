"""Decode worker choice in the gateway pipeline (services/gateway/pipeline.py): suspect workers,
ones that just refused a call or dropped a stream (e.g. back from a freeze), are avoided while
another worker is there, and used rather than failing the request when none is."""

from __future__ import annotations

import openai
import pytest

from tests.stack import start_stack

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def client(stack) -> openai.AsyncOpenAI:
    return stack.openai(timeout=60)


async def complete(stack, prompt: str, max_tokens: int = 6) -> list[int]:
    resp = await client(stack).completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    return resp.choices[0].model_extra["token_ids"]


def served(worker) -> int:
    return sum(worker.kv_sources.values())  # one count per request that reached the worker


async def test_a_suspect_decode_worker_serves_when_it_is_the_only_one(store_url, tiny_model):
    stack = await start_stack(store_url, tiny_model, decode=1)
    try:
        (decode,) = stack.decode
        stack.gateway.pipeline.mark_suspect(decode.config.worker_id)
        assert len(await complete(stack, "the only worker just thawed")) == 6
        assert served(decode) == 1
    finally:
        await stack.stop()


async def test_decode_workers_that_are_not_suspect_are_preferred(store_url, tiny_model):
    stack = await start_stack(store_url, tiny_model, decode=2)
    try:
        suspect, healthy = stack.decode
        for i in range(6):  # random two-choice routing would hit both workers in 6 requests
            # marked again before each request: a mark lapses after SUSPECT_S on a slow machine
            stack.gateway.pipeline.mark_suspect(suspect.config.worker_id)
            assert len(await complete(stack, f"request {i} avoids the suspect")) == 6
        assert (served(suspect), served(healthy)) == (0, 6)
    finally:
        await stack.stop()
