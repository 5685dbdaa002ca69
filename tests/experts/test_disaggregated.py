"""MoE through the whole pipeline (HTTP -> gateway -> decode -> prefill): experts colocated in the
workers, or disaggregated to experts servers in two groups; greedy tokens equal transformers'.
Then the placement changes under load (a hot expert replicated into another group, a new group
added, a replica drained) and no request fails or changes its tokens."""

from __future__ import annotations

import asyncio

import openai
import pytest

from services.common.store import connect
from services.decode.config import DecodeConfig
from services.decode.server import DecodeWorker
from services.experts.placement_store import read_placement, write_placement
from services.gateway.config import GatewayConfig
from services.gateway.server import Gateway
from services.prefill.config import PrefillConfig
from services.prefill.server import PrefillWorker
from tests.conftest import greedy_reference

from .conftest import start_experts

PROMPTS = [f"Expert {i} routes " + "the hot token " * (i % 5) + f"now {i}" for i in range(8)]
MAX_TOKENS = [5 + (i * 3) % 9 for i in range(8)]


async def start_pipeline(store_url, prefix, model_dir, experts: str):
    common = dict(model_dir=str(model_dir), store_url=store_url, store_prefix=prefix, report_interval_s=0.2,
                  heartbeat_ttl_s=1.0, experts=experts)
    workers = [PrefillWorker(PrefillConfig(**common)), DecodeWorker(DecodeConfig(**common, kv_slots=16, max_concurrency=16))]
    for w in workers:
        await w.start()
    gateway = Gateway(GatewayConfig(model_dir=str(model_dir), store_url=store_url, store_prefix=prefix,
                                    http_port=0, refresh_s=0.1))
    await gateway.start()
    return gateway, workers


async def stop_all(gateway, workers, servers=()):
    await gateway.stop(1.0)
    for w in list(workers) + list(servers):
        try:
            await asyncio.wait_for(w.stop(1.0), timeout=15)
        except asyncio.TimeoutError:
            for task in asyncio.all_tasks():  # say what the stop is stuck on before failing
                task.print_stack()
            raise AssertionError(f"{w.name} did not stop within 15 s") from None


async def generate(base_url: str, prompts=PROMPTS, max_tokens=MAX_TOKENS) -> list[list[int]]:
    # closed, not collected: see LocalStack.openai in tests/stack.py
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:

        async def one(i):
            await asyncio.sleep(0.02 * i)  # staggered: requests join a running decode batch
            resp = await client.completions.create(model="tiny-moe", prompt=prompts[i], max_tokens=max_tokens[i],
                                                   temperature=0,
                                                   extra_body={"return_token_ids": True, "ignore_eos": True})
            return resp.choices[0].model_extra["token_ids"]

        return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))


@pytest.fixture(scope="module")
def expected(tiny_moe_model):
    return greedy_reference(tiny_moe_model, PROMPTS, MAX_TOKENS, ignore_eos=True)


async def test_colocated_and_disaggregated_greedy_equal_transformers(store_url, prefix, tiny_moe_model, expected):
    gateway, workers = await start_pipeline(store_url, prefix + "-local", tiny_moe_model, "local")
    try:
        colocated = await generate(f"http://127.0.0.1:{gateway.http_port}")
    finally:
        await stop_all(gateway, workers)
    assert colocated == expected

    servers = await start_experts(store_url, prefix, tiny_moe_model, ["g0", "g1"], num_groups=2)
    gateway, workers = await start_pipeline(store_url, prefix, tiny_moe_model, "remote")
    try:
        remote = await generate(f"http://127.0.0.1:{gateway.http_port}")
        # both groups computed: prefill and decode each made calls, one per group per layer per step
        assert all(s.tokens_in.rate() > 0 for s in servers)
        assert all(w.remote_experts.calls > 0 for w in workers)
    finally:
        await stop_all(gateway, workers, servers)
    assert remote == expected


async def test_placement_changes_under_load_fail_no_request(store_url, prefix, tiny_moe_model, expected):
    servers = await start_experts(store_url, prefix, tiny_moe_model, ["g0", "g1"], num_groups=2)
    gateway, workers = await start_pipeline(store_url, prefix, tiny_moe_model, "remote")
    store = connect(store_url)
    changes = []

    async def change_placement():
        await asyncio.sleep(0.3)
        placement = await read_placement(store, prefix)
        # 1. replicate expert 0 (hot) into g1: its tokens are now split between both groups
        placement = placement.replicate(0, "g1")
        assert await write_placement(store, prefix, placement)
        changes.append(placement.version)
        await asyncio.sleep(0.4)
        # 2. a new group "hot" with a copy of experts 0 and 1, served by a new server
        servers.extend(await start_experts(store_url, prefix, tiny_moe_model, ["hot"], num_groups=2))
        placement = placement.replicate(0, "hot").replicate(1, "hot")
        assert await write_placement(store, prefix, placement)
        changes.append(placement.version)
        await asyncio.sleep(0.4)
        # 3. g1 loses its only replica (drains and stops): its calls go to other servers
        await asyncio.wait_for(servers[1].stop(2.0), timeout=20)  # drain 1-2 s, then stop
        changes.append("g1 stopped")

    done = asyncio.Event()

    async def keep_loading(base):
        """Rounds of concurrent requests, back to back, until the changes are over."""
        rounds = []
        while not done.is_set():
            rounds.append(await generate(base))
        return rounds

    async def changes_then_done():
        try:
            await change_placement()
        finally:
            done.set()

    try:
        base = f"http://127.0.0.1:{gateway.http_port}"
        first, _, second = await asyncio.gather(keep_loading(base), changes_then_done(), keep_loading(base))
        again = await generate(base)
    finally:
        await store.aclose()
        await stop_all(gateway, workers, [s for i, s in enumerate(servers) if i != 1])
    assert len(changes) == 3
    assert all(tokens == expected for tokens in first + second + [again])
    assert servers[2].tokens_in.rate() > 0, "the new group was used"
    assert all(w.remote_experts.view.placement.version == changes[1] for w in workers)
