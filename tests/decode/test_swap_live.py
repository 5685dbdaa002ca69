"""A live decode worker with a swap space and a KV pool far smaller than the load, through
the gateway's OpenAI API: streamed requests all complete (none hangs), each streams exactly
its greedy tokens once (a swap neither drops nor repeats one), sequences were swapped out
and back, and the config comes from the environment."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from services.common.config import from_env
from services.decode.config import DecodeConfig
from services.engine.model_config import ModelConfig
from tests.conftest import greedy_reference
from tests.stack import start_stack

BLOCK = 8
BLOCKS = 40  # 320 tokens of KV for 12 requests of ~20 prompt + up to 40 output tokens


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(store_url, tiny_model, one_torch_thread):  # the workers set one thread; the fixture restores it
    kv_bytes_per_token = ModelConfig.from_dir(tiny_model).kv_bytes_per_token(4)  # fp32
    s = await start_stack(
        store_url, tiny_model,
        decode_overrides={
            "local_prefill_threshold": 100_000, "threads": 1, "kv_block_size": BLOCK, "step_token_budget": 64,
            "kv_cache_bytes": BLOCKS * BLOCK * kv_bytes_per_token,
            "swap_space_bytes": 4 * BLOCKS * BLOCK * kv_bytes_per_token, "swap_min_tokens": 1,
        },
        prefill_overrides={"threads": 1},
    )
    yield s
    await s.stop()


@pytest.mark.asyncio(loop_scope="module")
async def test_streams_through_swaps_complete_with_each_token_once(stack, tiny_model):
    e = stack.decode[0].engine
    assert e.swap is not None and e.swap.num_blocks == 4 * BLOCKS
    prompts = [f"Request {i}: swap the blocks out, then " + "page them back in " * (i % 3) for i in range(12)]
    max_tokens = [24 + (i * 5) % 17 for i in range(12)]
    client = stack.openai(timeout=120)

    async def one(i: int) -> tuple[list[int], str | None]:
        stream = await client.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=max_tokens[i], temperature=0, stream=True,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        ids, finish = [], None
        async for chunk in stream:
            ids += chunk.choices[0].model_extra.get("token_ids") or []
            finish = chunk.choices[0].finish_reason or finish
        return ids, finish

    got = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(12))), timeout=180)  # never hangs
    want = await asyncio.to_thread(greedy_reference, tiny_model, prompts, max_tokens, True)
    assert [ids for ids, _ in got] == want  # each token once, in order, the unpreempted greedy ones
    assert all(f == "length" for _, f in got)
    s = e.scheduler
    assert s.swaps_out > 0 and s.swaps_in == s.swaps_out, "the pool should have been too small for all at once"
    assert e.swap.num_used_blocks == 0 and e.kv.num_used_blocks == 0 and e.slots.used == 0
    e.swap.check()
    e.kv.check()


def test_swap_and_mirror_settings_from_the_environment():
    cfg = from_env(DecodeConfig, env={"ELASTUNE_DECODE_MIRROR": "false", "ELASTUNE_SWAP_SPACE_BYTES": "1048576",
                                      "ELASTUNE_SWAP_MIN_TOKENS": "32"})
    assert (cfg.decode_mirror, cfg.swap_space_bytes, cfg.swap_min_tokens) == (False, 1 << 20, 32)
    defaults = from_env(DecodeConfig, env={})
    assert defaults.decode_mirror is True and defaults.swap_space_bytes == 0  # as before: mirror on, recompute only
    with pytest.raises(ValueError, match="swap_space_bytes"):
        DecodeConfig(swap_space_bytes=-1).validate()
