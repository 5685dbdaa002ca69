"""A live decode worker that prefills prompts itself, in chunks, with a KV pool far smaller
than the load: greedy tokens through the HTTP API still equal transformers', sequences are
preempted and recomputed, shared prompt prefixes share blocks, and a prompt that can never
fit is INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import pytest_asyncio
import torch

from services.proto import inference_pb2 as pb
from services.proto import inference_pb2_grpc as pb_grpc
from tests.conftest import greedy_reference
from tests.stack import start_stack

pytestmark = pytest.mark.asyncio(loop_scope="module")

BLOCK = 8
BLOCKS = 48  # 384 tokens of KV for 16 requests of up to ~70 tokens each
KV_BYTES_PER_TOKEN = 2 * 4 * 2 * 32 * 4  # tiny model: layers, KV heads, head dim, fp32


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(store_url, tiny_model):
    threads = torch.get_num_threads()
    s = await start_stack(
        store_url, tiny_model,
        decode_overrides={
            "local_prefill_threshold": 100_000, "threads": 1, "kv_block_size": BLOCK, "step_token_budget": 24,
            "kv_cache_bytes": BLOCKS * BLOCK * KV_BYTES_PER_TOKEN,
        },
        prefill_overrides={"threads": 1},
    )
    assert s.decode[0].engine.kv.num_blocks == BLOCKS
    yield s
    await s.stop()
    torch.set_num_threads(threads)


async def test_chunked_local_prefill_under_preemption_matches_transformers(stack, tiny_model):
    worker = stack.decode[0]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        reply = await pb_grpc.AdminStub(channel).SetConfig(pb.RuntimeConfig(prefill_chunk_size=10))
    assert reply.prefill_chunk_size == 10 and worker.engine.scheduler.chunk_size == 10
    system = "You are a careful assistant. Answer briefly and exactly. "
    prompts = [system + f"Question {i}: " + "why do blocks page " * (i % 5) for i in range(16)]
    max_tokens = [18 + (i * 7) % 13 for i in range(16)]
    client = stack.openai(timeout=120)

    async def one(i: int):
        resp = await client.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=max_tokens[i], temperature=0,
            extra_body={"return_token_ids": True},
        )
        return resp.choices[0].model_extra["token_ids"]

    got = await asyncio.gather(*(one(i) for i in range(16)))
    assert got == await asyncio.to_thread(greedy_reference, tiny_model, prompts, max_tokens)
    e = worker.engine
    assert worker.kv_sources == {"local": 16}
    assert e.scheduler.preemptions > 0, "the pool should have been too small for every sequence at once"
    assert e.kv.prefix_hits > 0, "the shared system prompt should have been served from cached blocks"
    steps = e.profile.records()
    assert max(s.tokens for s in steps) <= 24
    assert any(s.prefill_tokens and s.decode_tokens for s in steps)
    assert e.slots.used == 0 and e.kv.num_used_blocks == 0
    e.kv.check()


async def test_prompt_larger_than_the_pool_is_invalid_argument(stack):
    worker = stack.decode[0]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        call = pb_grpc.DecodeStub(channel).Generate(pb.DecodeRequest(
            request_id="too-long", prompt_token_ids=[5] * (BLOCKS * BLOCK), sampling=pb.SamplingParams(max_tokens=4),
        ))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt_token_ids" in info.value.details() and "tokens at most" in info.value.details()
    assert worker.engine.slots.used == 0
