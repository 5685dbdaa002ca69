"""The gateway's HTTP API against a real in-process pipeline: errors, streaming, cancellation."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from services.gateway.config import GatewayConfig
from services.gateway.server import Gateway
from tests.stack import start_stack

TIMEOUT = aiohttp.ClientTimeout(total=30)


@pytest.fixture
async def stack(store_url, tiny_model):
    s = await start_stack(store_url, tiny_model)
    yield s
    await s.stop()


async def post(base: str, path: str, body, raw: bool = False):
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        data = body if raw else None
        async with http.post(base + path, data=data, json=None if raw else body) as resp:
            return resp.status, await resp.json(), resp.headers


BAD_COMPLETIONS = [
    ({"prompt": "hi", "max_tokens": 4}, "model"),
    ({"model": "tiny", "max_tokens": 4}, "prompt"),
    ({"model": "tiny", "prompt": 5}, "prompt"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": "4"}, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 100000}, "max_tokens"),
    ({"model": "gpt-4", "prompt": "hi"}, "model"),
    ({"model": "tiny", "prompt": "hi", "temperature": 2.5}, "temperature"),
    ({"model": "tiny", "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "hi", "stream": "yes"}, "stream"),
    ({"model": "tiny", "prompt": [1, 2, 99999]}, "prompt"),
    ({"model": "tiny", "prompt": list(range(5, 2105))}, "prompt"),  # longer than the 2048-token window
]


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS)
async def test_bad_completion_requests_get_400_naming_the_field(stack, body, param):
    status, payload, _ = await post(stack.base_url, "/v1/completions", body)
    assert status == 400
    assert payload["error"]["param"] == param
    assert payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["message"]


async def test_malformed_json_and_bad_chat_messages(stack):
    status, payload, _ = await post(stack.base_url, "/v1/completions", b"{not json", raw=True)
    assert status == 400 and "JSON" in payload["error"]["message"]
    status, payload, _ = await post(stack.base_url, "/v1/chat/completions",
                                    {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]})
    assert status == 400 and payload["error"]["param"] == "messages[0].role"
    status, payload, _ = await post(stack.base_url, "/v1/chat/completions", {"model": "tiny", "messages": []})
    assert status == 400 and payload["error"]["param"] == "messages"


async def test_prompt_plus_max_tokens_over_the_window(stack):
    status, payload, _ = await post(stack.base_url, "/v1/completions",
                                    {"model": "tiny", "prompt": list(range(5, 2045)), "max_tokens": 100})
    assert status == 400 and payload["error"]["param"] == "max_tokens"
    assert "2048" in payload["error"]["message"]


async def test_no_worker_gives_503_with_retry_after(store_url, tiny_model):
    gw = Gateway(GatewayConfig(model_dir=str(tiny_model), store_url=store_url, store_prefix="empty-test", http_port=0))
    await gw.start()
    try:
        status, payload, headers = await post(f"http://127.0.0.1:{gw.http_port}", "/v1/completions",
                                              {"model": "tiny", "prompt": "hi", "max_tokens": 3})
        assert status == 503
        assert "no decode worker" in payload["error"]["message"]
        assert int(headers["Retry-After"]) >= 1
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            async with http.get(f"http://127.0.0.1:{gw.http_port}/health") as resp:
                assert resp.status == 503
    finally:
        await gw.stop(1.0)


async def test_a_request_just_after_the_decode_stage_vanished_waits_one_ttl_for_it(store_url, tiny_model):
    """The directory can drop a live worker whose heartbeat is late (a stall of this process or of
    the store). A request arriving within one heartbeat TTL of the stage emptying is held until the
    worker is back; once the TTL has passed, a request with no decode worker fails at once."""
    ttl = 1.5
    stack = await start_stack(store_url, tiny_model, gateway_overrides={"heartbeat_ttl_s": ttl})
    pipeline, registration = stack.gateway.pipeline, stack.decode[0]._registration
    body = {"model": "tiny", "prompt": "still there?", "max_tokens": 3}

    async def vanish() -> None:
        await registration.stop()  # the heartbeat stops and the report leaves the store
        for _ in range(200):
            if not pipeline.workers["decode"]:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the gateway kept routing to a worker gone for longer than its TTL")

    try:
        await vanish()
        pending = asyncio.create_task(post(stack.base_url, "/v1/completions", body))
        await asyncio.sleep(0.3)
        assert not pending.done()  # held, not answered 503
        await registration.start()
        status, payload, _ = await asyncio.wait_for(pending, 20)
        assert status == 200 and payload["usage"]["completion_tokens"] == 3

        await vanish()
        await asyncio.sleep(ttl)
        started = asyncio.get_running_loop().time()
        status, payload, _ = await post(stack.base_url, "/v1/completions", body)
        assert status == 503 and "no decode worker" in payload["error"]["message"]
        assert asyncio.get_running_loop().time() - started < ttl / 2
    finally:
        await stack.stop()


async def test_models_health_and_metrics(stack):
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.get(stack.base_url + "/v1/models") as resp:
            assert (await resp.json())["data"][0]["id"] == "tiny"
        async with http.get(stack.base_url + "/health") as resp:
            assert resp.status == 200 and (await resp.json())["workers"] == {"prefill": 1, "decode": 1}
        await post(stack.base_url, "/v1/completions", {"model": "tiny", "prompt": "count me", "max_tokens": 3})
        async with http.get(stack.base_url + "/metrics") as resp:
            text = await resp.text()
    assert 'elastune_gateway_requests_total{endpoint="completions",status="200"} 1.0' in text
    assert "elastune_gateway_ttft_seconds_count 1.0" in text


async def test_client_disconnect_frees_the_decode_sequence(stack):
    decode = stack.decode[0]
    body = {"model": "tiny", "prompt": "a long answer", "max_tokens": 1500, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.post(stack.base_url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            for _ in range(3):
                await resp.content.readline()
            assert decode.engine.slots.used == 1
    for _ in range(100):  # the slot comes back within a step or two of the disconnect
        if decode.engine.slots.used == 0:
            break
        await asyncio.sleep(0.02)
    assert decode.engine.slots.used == 0
    assert decode.engine.running == 0


async def test_stop_string_ends_the_stream_and_frees_the_slot(stack):
    status, plain, _ = await post(stack.base_url, "/v1/completions",
                                  {"model": "tiny", "prompt": "stop here", "max_tokens": 30, "temperature": 0,
                                   "ignore_eos": True})
    text = plain["choices"][0]["text"]
    assert status == 200 and len(text) > 6
    stop = text[3:6]
    status, cut, _ = await post(stack.base_url, "/v1/completions",
                                {"model": "tiny", "prompt": "stop here", "max_tokens": 30, "temperature": 0,
                                 "ignore_eos": True, "stop": [stop]})
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert stack.decode[0].engine.slots.used == 0 or await _eventually_free(stack.decode[0])


async def _eventually_free(decode) -> bool:
    for _ in range(100):
        if decode.engine.slots.used == 0:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_request_is_held_while_the_stage_scales_from_zero(store_url, tiny_model):
    from services.decode.config import DecodeConfig
    from services.decode.server import DecodeWorker
    from services.prefill.config import PrefillConfig
    from services.prefill.server import PrefillWorker

    prefix = "cold-start-test"
    gw = Gateway(GatewayConfig(model_dir=str(tiny_model), store_url=store_url, store_prefix=prefix, http_port=0,
                               refresh_s=0.05, cold_start_wait_s=20))
    await gw.start()
    common = dict(model_dir=str(tiny_model), store_url=store_url, store_prefix=prefix, report_interval_s=0.2,
                  heartbeat_ttl_s=1.0)
    workers = []
    try:
        pending = asyncio.create_task(post(f"http://127.0.0.1:{gw.http_port}", "/v1/completions",
                                           {"model": "tiny", "prompt": "wake up", "max_tokens": 3}))
        await asyncio.sleep(0.5)
        assert not pending.done() and gw.pipeline.queued == 1  # held, and visible to the scaler
        workers = [PrefillWorker(PrefillConfig(**common)), DecodeWorker(DecodeConfig(**common, kv_slots=4, max_concurrency=4))]
        for w in workers:
            await w.start()
        status, payload, _ = await asyncio.wait_for(pending, 20)
        assert status == 200 and payload["usage"]["completion_tokens"] == 3
    finally:
        await gw.stop(1.0)
        for w in workers:
            await w.stop(1.0)
