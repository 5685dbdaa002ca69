"""A live decode worker with a small KV pool and a swap space: streamed completions through
the gateway (official openai client) all finish, each token arrives once, greedy tokens
equal transformers', while sequences are swapped out and back in."""

from __future__ import annotations

import asyncio

import openai
import pytest
import pytest_asyncio
import torch

from tests.conftest import greedy_reference
from tests.stack import start_stack

pytestmark = pytest.mark.asyncio(loop_scope="module")

BLOCK = 8
BLOCKS = 40
KV_BYTES_PER_TOKEN = 2 * 4 * 2 * 32 * 4  # tiny model: layers, KV heads, head dim, fp32


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(store_url, tiny_model):
    threads = torch.get_num_threads()
    block_bytes = BLOCK * KV_BYTES_PER_TOKEN
    s = await start_stack(
        store_url, tiny_model,
        decode_overrides={
            "local_prefill_threshold": 100_000, "threads": 1, "kv_block_size": BLOCK, "step_token_budget": 32,
            "kv_cache_bytes": BLOCKS * block_bytes, "swap_space_bytes": 64 * block_bytes, "swap_min_tokens": 8,
        },
        prefill_overrides={"threads": 1},
    )
    yield s
    await s.stop()
    torch.set_num_threads(threads)


async def test_streams_through_swaps_finish_once_each_with_greedy_tokens(stack, tiny_model):
    worker = stack.decode[0]
    prompts = [f"Request {i}: " + "swap me out and back " * (1 + i % 4) for i in range(12)]
    max_tokens = [24 + (i * 5) % 11 for i in range(12)]
    client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(i: int) -> list[int]:
        stream = await client.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=max_tokens[i], temperature=0, stream=True,
            extra_body={"return_token_ids": True},
        )
        tokens, finishes = [], []
        async for chunk in stream:
            choice = chunk.choices[0] if chunk.choices else None
            if choice is None:
                continue
            tokens.extend(choice.model_extra.get("token_ids") or [])
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
        assert len(finishes) == 1  # finished exactly once
        return tokens

    got = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(12))), 180)  # never hangs
    assert got == await asyncio.to_thread(greedy_reference, tiny_model, prompts, max_tokens)  # no token twice or lost
    e = worker.engine
    assert e.scheduler.swaps_out > 0, "the pool should have been too small for every sequence at once"
    assert e.scheduler.swaps_in == e.scheduler.swaps_out
    assert e.slots.used == 0 and e.kv.num_used_blocks == 0 and e.swap.num_used_blocks == 0
    e.kv.check()
    e.swap.check()
