"""The decode worker takes prompt KV over the tcp path (services/common/kv_tcp.py) from a real
prefill worker: greedy outputs through the whole stack are unchanged, a connection reset
mid-stream makes the decode worker compute the prompt itself (blocks freed, the partial buffer
never reused), `auto` picks tcp for a prefill worker on another host and shared memory on this
one, and the KV copy into blocks runs off the event loop, before the sequence is scheduled."""

from __future__ import annotations

import asyncio
import threading
import uuid

import grpc
import openai
import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from services.common.kv_transport import host_id
from services.decode.config import DecodeConfig
from services.decode.server import DecodeWorker
from services.proto import inference_pb2 as pb
from services.proto import inference_pb2_grpc as pb_grpc
from tests.conftest import greedy_reference
from tests.stack import start_stack

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(store_url, tiny_model):
    s = await start_stack(store_url, tiny_model, decode_overrides={"kv_transport": "tcp"})
    yield s
    await s.stop()


def _client(stack) -> openai.AsyncOpenAI:
    return stack.openai(timeout=60)


async def _complete(client, prompt: str, max_tokens: int) -> list[int]:
    resp = await client.completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"return_token_ids": True},
    )
    return resp.choices[0].model_extra["token_ids"]


async def _idle(decode) -> None:
    for _ in range(200):  # the engine releases a finished sequence at its next step
        if decode.engine.slots.used == 0:
            return
        await asyncio.sleep(0.02)


async def test_greedy_outputs_are_unchanged_over_tcp(stack, tiny_model):
    decode = stack.decode[0]
    assert decode.kv_tcp is not None and decode.kv_tcp_address.endswith(f":{decode.kv_tcp.port}")
    before = decode.kv_sources.copy()
    prompts = ["a raw socket carries the KV " * k for k in (1, 3, 7)] + ["short", "the same prompt twice " * 2] * 2
    max_tokens = [8, 5, 12, 3, 6, 3, 6]
    got = await asyncio.gather(*(_complete(_client(stack), p, n) for p, n in zip(prompts, max_tokens)))
    assert got == await asyncio.to_thread(greedy_reference, tiny_model, prompts, max_tokens)
    assert decode.kv_sources - before == {"tcp": len(prompts)}
    assert decode.kv_tcp.pending == 0  # every token used or given up
    assert 0 < decode.kv_tcp.pool.idle_bytes  # complete buffers are kept for the next prompts
    await _idle(decode)
    assert decode.engine.kv.num_used_blocks == 0


async def test_a_connection_reset_mid_stream_falls_back_and_frees_everything(stack, tiny_model):
    decode, prefill = stack.decode[0], stack.prefill[0]
    model = prefill.runner.model
    resets = []

    def reset_at_layer_2(module, args):  # prefill thread: layers 0 and 1 are on their way
        resets.append(decode.kv_tcp.reset_connections())

    local_before = decode.kv_sources["local"]
    prompt = "the connection breaks in the middle of this prompt " * 2
    handle = model.layers[2].input_layernorm.register_forward_pre_hook(reset_at_layer_2)
    try:
        with capture_logs() as logs:
            got = await _complete(_client(stack), prompt, 8)
    finally:
        handle.remove()
    assert got == (await asyncio.to_thread(greedy_reference, tiny_model, [prompt], [8]))[0]  # computed here instead
    assert resets == [1]  # the prompt's connection was open, and was cut
    assert decode.kv_sources["local"] == local_before + 1
    fallback = [e for e in logs if e["event"] == "decode.prefill_fallback"]
    assert len(fallback) == 1 and "tcp" in fallback[0]["error"]  # says what broke
    await _idle(decode)
    assert decode.engine.slots.used == 0 and decode.engine.kv.num_used_blocks == 0
    assert decode.kv_tcp.pending == 0
    assert await _complete(_client(stack), "and the next prompt goes over tcp again", 4)
    assert prefill.active == 0


async def test_kv_is_written_off_the_event_loop_and_before_the_sequence_runs(stack, tiny_model):
    """The first KV write blocks until the test lets it go: meanwhile an Admin RPC on the same
    worker answers (the loop is free) and the sequence is not in the engine."""
    decode = stack.decode[0]
    engine = decode.engine
    entered, release = threading.Event(), threading.Event()
    events = []
    write_kv, add = engine.write_kv, engine.add

    def slow_write(seq, layer, kv):
        events.append(("write", layer))
        if not entered.is_set():
            entered.set()
            release.wait(timeout=60)
        write_kv(seq, layer, kv)

    def recording_add(seq):
        events.append(("add", None))
        add(seq)

    engine.write_kv, engine.add = slow_write, recording_add
    prompt = "a large KV copy must not stall the worker"
    try:
        request = asyncio.ensure_future(_complete(_client(stack), prompt, 6))
        assert await asyncio.to_thread(entered.wait, 30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{decode.port}") as channel:
            report = await pb_grpc.AdminStub(channel).GetLoad(pb.Empty(), timeout=10)
        assert report.running_seqs == 1  # seated, KV on its way
        assert engine.running == 0 and ("add", None) not in events  # not scheduled before its KV is in
        release.set()
        got = await asyncio.wait_for(request, 60)
    finally:
        release.set()
        engine.__dict__.pop("write_kv", None)
        engine.__dict__.pop("add", None)
    assert got == (await asyncio.to_thread(greedy_reference, tiny_model, [prompt], [6]))[0]
    writes = [layer for kind, layer in events if kind == "write"]
    assert writes == list(range(decode.runner.config.num_layers))  # every layer once, in order
    assert events.index(("add", None)) == len(writes)  # added after the last write


async def test_auto_uses_tcp_for_another_host_and_shared_memory_for_this_one(stack, store_url, tiny_model):
    decode = DecodeWorker(DecodeConfig(
        model_dir=str(tiny_model), store_url=store_url, store_prefix=f"test-{uuid.uuid4().hex[:8]}",
        report_interval_s=0.2, heartbeat_ttl_s=1.0, kv_slots=4, max_concurrency=4,
    ))
    await decode.start()
    try:
        prompt = list(range(3, 40))
        got = {}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{decode.port}") as channel:
            stub = pb_grpc.DecodeStub(channel)
            for name, address, host in (("local", "", ""), ("other", f"127.0.0.1:{stack.prefill[0].port}", "elsewhere/boot"),
                                        ("same", f"127.0.0.1:{stack.prefill[0].port}", host_id())):
                tokens = []
                async for chunk in stub.Generate(pb.DecodeRequest(
                    request_id=name, prompt_token_ids=prompt, sampling=pb.SamplingParams(max_tokens=6),
                    prefill_address=address, prefill_host_id=host,
                )):
                    tokens += chunk.token_ids
                got[name] = tokens
        assert decode.kv_sources == {"local": 1, "tcp": 1, "shm": 1}
        assert got["other"] == got["local"] and got["same"] == got["local"]
    finally:
        await decode.stop(1.0)
