"""Admission, budgets, auth and timeouts through a real stack (gateway + prefill + decode + store).

One pair of workers serves the module; each test starts its own gateway (cheap) with the
settings it needs, on the same store prefix.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import grpc
import openai
import pytest
import pytest_asyncio

from services.common.load_report import LoadReport
from services.common.registry import WorkerRegistration
from services.common.store import connect
from services.decode.config import DecodeConfig
from services.decode.server import DecodeWorker
from services.gateway.config import GatewayConfig
from services.gateway.server import Gateway
from services.proto import inference_pb2 as pb
from services.proto import inference_pb2_grpc as pb_grpc
from tests.stack import start_stack

pytestmark = pytest.mark.asyncio(loop_scope="module")
TIMEOUT = aiohttp.ClientTimeout(total=30)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(store_url, tiny_model):
    s = await start_stack(store_url, tiny_model, decode=0)
    # one sequence at a time: KV capacity is a single 2048-token slot, easy to fill
    decode = DecodeWorker(DecodeConfig(model_dir=str(tiny_model), store_url=store_url,
                                       store_prefix=s.gateway.config.store_prefix, report_interval_s=0.2,
                                       heartbeat_ttl_s=1.0, kv_slots=1, max_concurrency=1))
    await decode.start()
    s.decode.append(decode)
    await wait_for(lambda: s.gateway.pipeline.workers["decode"])
    yield s
    await s.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def gateway_factory(stack, tiny_model, store_url):
    started = []

    async def make(**overrides) -> Gateway:
        gw = Gateway(GatewayConfig(model_dir=str(tiny_model), store_url=store_url,
                                   store_prefix=stack.gateway.config.store_prefix, http_port=0, refresh_s=0.1,
                                   **overrides))
        await gw.start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        await gw.stop(1.0)


def url(gw: Gateway) -> str:
    return f"http://127.0.0.1:{gw.http_port}"


async def post(gw: Gateway, body: dict, headers: dict | None = None):
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.post(url(gw) + "/v1/completions", json=body, headers=headers or {}) as resp:
            return resp.status, await resp.json(), resp.headers


async def wait_for(predicate, seconds: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.02)


async def slots_free(stack) -> None:
    await wait_for(lambda: stack.decode[0].engine.slots.used == 0)


async def test_kv_headroom_rejects_with_429_and_retry_after(stack):
    gw = stack.gateway  # admission is on by default
    long_prompt = list(range(5, 1505))
    body = {"model": "tiny", "prompt": long_prompt, "max_tokens": 400, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.post(url(gw) + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            await resp.content.readline()
            # the decode worker's report (every 0.2 s) shows the 1500-token sequence
            await wait_for(lambda: any(w.kv_used_tokens > 1500 for w in gw.pipeline.workers["decode"]))
            status, payload, headers = await post(gw, {"model": "tiny", "prompt": "hi", "max_tokens": 500})
            assert status == 429
            err = payload["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "overloaded"
            assert "KV room" in err["message"] and "retry after" in err["message"]
            assert int(headers["Retry-After"]) >= 1
    await slots_free(stack)
    await wait_for(lambda: all(w.kv_used_tokens == 0 for w in gw.pipeline.workers["decode"]))
    status, payload, _ = await post(gw, {"model": "tiny", "prompt": "hi", "max_tokens": 500})
    assert status == 200 and payload["usage"]["completion_tokens"] >= 1
    assert gw.metrics.rejected.labels("kv_headroom")._value.get() >= 1


async def test_deadline_feasibility_rejects_http_and_grpc(stack, gateway_factory, store_url):
    gw = await gateway_factory(ttft_slo_s=2.0)
    # A prefill worker reporting a backlog it needs 100 s to clear. It is a report in the real
    # store, read by the gateway like any other; nothing is ever routed to its address because
    # admission refuses first. The real prefill worker drains meanwhile (draining workers do
    # not count: the router sends them nothing), so the backlogged one is the only one.
    real = stack.prefill[0]
    await real.begin_drain()
    prefix = stack.gateway.config.store_prefix
    store = connect(store_url)
    backlog = LoadReport("backlogged", "prefill", "127.0.0.1:9", "elsewhere", "tiny", time.time(),
                         queue_len=100, queued_tokens=100_000, prompt_tokens_per_s=1_000.0)
    reg = WorkerRegistration(store, prefix, lambda: backlog, interval_s=0.2, ttl_s=1.0)
    await reg.start()
    try:
        await wait_for(lambda: any(w.worker_id == "backlogged" for w in gw.pipeline.workers["prefill"]))
        status, payload, headers = await post(gw, {"model": "tiny", "prompt": "late", "max_tokens": 4})
        assert status == 429
        assert "TTFT SLO of 2.0 s" in payload["error"]["message"]
        assert int(headers["Retry-After"]) == 30  # (100 s - 2 s) clamped to max_retry_after_s
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
            call = pb_grpc.GatewayStub(ch).Generate(pb.GenerateRequest(
                prompt="late", sampling=pb.SamplingParams(max_tokens=4)), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [m async for m in call]
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry after 30 s" in err.value.details()
        assert dict(err.value.trailing_metadata())["retry-after-ms"] == "30000"
    finally:
        await reg.stop()
        await store.aclose()
        real.draining = False
        await real._registration.publish()
    await wait_for(lambda: [w.worker_id for w in gw.pipeline.workers["prefill"] if not w.draining]
                   == [real.config.worker_id])
    status, payload, _ = await post(gw, {"model": "tiny", "prompt": "on time", "max_tokens": 4})
    assert status == 200, payload


async def test_per_key_token_budget(stack, gateway_factory):
    gw = await gateway_factory(key_tokens_per_s=10, key_burst_tokens=60)
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    body = {"model": "tiny", "prompt": [5, 6, 7, 8, 9], "max_tokens": 40, "ignore_eos": True}
    status, payload, _ = await post(gw, body, a)  # 45 of 60 tokens
    assert status == 200 and payload["usage"]["completion_tokens"] == 40
    status, payload, headers = await post(gw, body, a)
    assert status == 429 and payload["error"]["code"] == "rate_limit_exceeded"
    # 15 left (plus what refilled during the first request), 45 needed: at most 30 tokens at 10 tokens/s
    assert 1 <= int(headers["Retry-After"]) <= 3 and "10 tokens/s" in payload["error"]["message"]
    status, _, _ = await post(gw, body, b)  # another key has its own bucket
    assert status == 200
    status, payload, _ = await post(gw, {**body, "max_tokens": 100}, b)  # can never fit the burst
    assert status == 400 and payload["error"]["param"] == "max_tokens" and "60" in payload["error"]["message"]
    # a short answer gives its unused tokens back: a stop string ends it after a few tokens
    greedy = {**body, "temperature": 0}
    _, full, _ = await post(gw, greedy, {"Authorization": "Bearer key-d"})
    stop = full["choices"][0]["text"][2:5]
    status, payload, _ = await post(gw, {**greedy, "stop": [stop]}, {"Authorization": "Bearer key-c"})
    assert status == 200 and payload["usage"]["completion_tokens"] < 10
    # charged 45, refunded all but 5 + the few tokens made; without the refund it would be ~15
    assert gw.gate.budgets.level(gw.auth.identify("Bearer key-c")) >= 45


async def test_budget_shared_by_two_gateways_through_the_store(stack, gateway_factory):
    shared = dict(key_tokens_per_s=10, key_burst_tokens=60, key_budget_shared=True)
    one, two = await gateway_factory(**shared), await gateway_factory(**shared)
    key = {"Authorization": f"Bearer key-shared-{time.time_ns()}"}
    body = {"model": "tiny", "prompt": [5, 6, 7, 8, 9], "max_tokens": 40, "ignore_eos": True}
    status, payload, _ = await post(one, body, key)
    assert status == 200, payload
    status, payload, headers = await post(two, body, key)  # the other gateway sees the same bucket
    assert status == 429 and payload["error"]["code"] == "rate_limit_exceeded", payload
    assert 1 <= int(headers["Retry-After"]) <= 3
    caller = one.auth.identify(key["Authorization"])
    assert 15 <= await two.gate.shared.level(caller) < 45  # charged once, refilling at 10 tokens/s


async def test_bearer_auth_with_the_openai_client(stack, gateway_factory, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("sk-from-file\n")
    gw = await gateway_factory(api_keys="sk-right", api_keys_file=str(keys))
    # closed, not collected: see LocalStack.openai in tests/stack.py
    for key in ("sk-right", "sk-from-file"):
        async with openai.AsyncOpenAI(base_url=url(gw) + "/v1", api_key=key, max_retries=0, timeout=30) as client:
            out = await client.completions.create(model="tiny", prompt="let me in", max_tokens=3)
            assert out.usage.completion_tokens == 3
            assert (await client.models.list()).data[0].id == "tiny"
    async with openai.AsyncOpenAI(base_url=url(gw) + "/v1", api_key="sk-wrong", max_retries=0, timeout=30) as wrong:
        with pytest.raises(openai.AuthenticationError) as err:
            await wrong.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=3)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.get(url(gw) + "/v1/models") as resp:  # no header at all
            assert resp.status == 401 and "Bearer" in (await resp.json())["error"]["message"]
        for path in ("/health", "/metrics"):  # probes and scrapes carry no key
            async with http.get(url(gw) + path) as resp:
                assert resp.status == 200
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
        stub = pb_grpc.GatewayStub(ch)
        request = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=2))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [m async for m in stub.Generate(request, timeout=10)]
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        msgs = [m async for m in stub.Generate(request, timeout=10, metadata=(("authorization", "Bearer sk-right"),))]
        assert msgs[-1].finish_reason


async def test_timeout_gives_504_and_frees_the_decode_slot(stack):
    gw = stack.gateway
    await slots_free(stack)
    body = {"model": "tiny", "prompt": "take your time", "max_tokens": 1500, "ignore_eos": True, "timeout": 0.5}
    started = time.monotonic()
    status, payload, _ = await post(gw, body)
    assert status == 504 and payload["error"]["type"] == "timeout_error"
    assert time.monotonic() - started < 5
    await slots_free(stack)
    # streaming, timeout from the header: the stream ends with an error event, the slot is freed
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.post(url(gw) + "/v1/completions", json={**body, "timeout": None, "stream": True},
                             headers={"X-Request-Timeout": "0.5"}) as resp:
            assert resp.status == 200
            events = [line async for line in resp.content if line.startswith(b"data: ")]
    assert b"timeout_error" in events[-1]
    await slots_free(stack)
    status, payload, _ = await post(gw, {**body, "timeout": 10_000})
    assert status == 400 and payload["error"]["param"] == "timeout"


async def test_grpc_timeout_is_deadline_exceeded(stack):
    await slots_free(stack)
    async with grpc.aio.insecure_channel(stack.grpc_address) as ch:
        call = pb_grpc.GatewayStub(ch).Generate(pb.GenerateRequest(
            prompt="slow", timeout_s=0.5, sampling=pb.SamplingParams(max_tokens=1500, ignore_eos=True)), timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [m async for m in call]
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await slots_free(stack)


async def test_prompt_limit_names_the_field(stack, gateway_factory):
    gw = await gateway_factory(max_prompt_tokens=8)
    status, payload, _ = await post(gw, {"model": "tiny", "prompt": list(range(5, 15)), "max_tokens": 2})
    assert status == 400 and payload["error"]["param"] == "prompt" and "at most 8" in payload["error"]["message"]
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.post(url(gw) + "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "many words " * 20}]}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["param"] == "messages"
