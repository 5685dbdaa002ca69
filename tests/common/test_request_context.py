"""The request id travels gateway -> decode -> prefill in gRPC metadata and is bound to each
service's log context while it serves that request."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import structlog

from services.common.request_context import (
    METADATA_KEY,
    RequestIdInterceptor,
    bind_request_id,
    current_request_id,
    outgoing_metadata,
)
from tests.stack import start_stack


async def test_interceptor_binds_per_rpc_without_leaking():
    seen: list[str | None] = []

    async def unary(request: bytes, context) -> bytes:
        await asyncio.sleep(0.01)  # concurrent calls interleave here
        seen.append(current_request_id())
        structlog.get_logger("t").info("handled")
        return request

    async def stream(request: bytes, context):
        for _ in range(2):
            await asyncio.sleep(0)
            seen.append(current_request_id())
            yield request

    handler = grpc.method_handlers_generic_handler("t.T", {
        "U": grpc.unary_unary_rpc_method_handler(unary),
        "S": grpc.unary_stream_rpc_method_handler(stream),
    })
    server = grpc.aio.server(interceptors=[RequestIdInterceptor()])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            u, s = ch.unary_unary("/t.T/U"), ch.unary_stream("/t.T/S")
            with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
                await asyncio.gather(*(u(b"x", metadata=((METADATA_KEY, f"req-{i}"),)) for i in range(5)))
            assert sorted(seen) == [f"req-{i}" for i in range(5)]
            assert sorted(e["request_id"] for e in logs) == sorted(seen)
            seen.clear()
            await u(b"x")  # no id: nothing bound, not a neighbour's id
            [m async for m in s(b"x", metadata=((METADATA_KEY, "stream-1"),))]
            assert seen == [None, "stream-1", "stream-1"]
    finally:
        await server.stop(0)


def test_outgoing_metadata_follows_the_bound_id():
    async def inside():
        assert outgoing_metadata() == ()
        bind_request_id("abc")
        assert outgoing_metadata() == ((METADATA_KEY, "abc"),)
        assert outgoing_metadata("given") == ((METADATA_KEY, "given"),)

    asyncio.run(inside())


async def test_request_id_reaches_decode_and_prefill(store_url, tiny_model):
    stack = await start_stack(store_url, tiny_model)
    seen: dict[str, str | None] = {}
    decode, prefill = stack.decode[0], stack.prefill[0]
    reserve, submit = decode.reserve, prefill.batcher.submit

    async def spy_reserve(*args, **kwargs):
        seen["decode"] = current_request_id()
        return await reserve(*args, **kwargs)

    def spy_submit(job):
        seen["prefill"] = current_request_id()
        return submit(job)

    decode.reserve, prefill.batcher.submit = spy_reserve, spy_submit
    try:
        async with aiohttp.ClientSession() as http:
            body = {"model": "tiny", "prompt": "trace me across services", "max_tokens": 2}
            async with http.post(stack.base_url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                rid = resp.headers["X-Request-Id"]
                assert (await resp.json())["id"] == rid
    finally:
        await stack.stop()
    assert seen == {"decode": rid, "prefill": rid}
