"""The prefill worker streams a prompt's KV layer by layer while later layers compute:
every layer arrives exactly once and in order (gRPC bytes, shared memory, tcp), layer 0 leaves
before the last layer is computed, and a model failure mid-stream ends the stream with a clear
status, leaves the worker serving, and lets the decode worker fall back and free its file."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import grpc
import pytest
import pytest_asyncio
import torch

from services.common import kv_transport
from services.common.kv_tcp import KvTcpServer
from services.common.kv_transport import GRPC, SHM, TCP, KvLayout, KvReceiver, ShmFile, host_id
from services.common.convert import sampling_from_proto
from services.proto import inference_pb2 as pb
from services.proto import inference_pb2_grpc as pb_grpc
from tests.conftest import greedy_reference
from tests.stack import start_stack

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = list(range(5, 60))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(store_url, tiny_model):
    s = await start_stack(store_url, tiny_model, prefill=1, decode=1)
    yield s
    await s.stop()


@pytest.fixture
def model(stack):
    return stack.prefill[0].runner.model


def _request(target: pb.KvTarget | None = None) -> pb.PrefillRequest:
    req = pb.PrefillRequest(request_id="stream-test", prompt_token_ids=PROMPT, sampling=pb.SamplingParams(max_tokens=4))
    if target is not None:
        req.kv_target.CopyFrom(target)
    return req


async def _prefill(stack, request: pb.PrefillRequest, on_message=None) -> list[pb.PrefillChunk]:
    messages = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.prefill[0].port}") as channel:
        async for msg in pb_grpc.PrefillStub(channel).Prefill(request):
            messages.append(msg)
            if on_message is not None:
                on_message(msg)
    return messages


def _kinds(messages) -> list[str]:
    return [m.WhichOneof("kind") for m in messages]


@pytest_asyncio.fixture(loop_scope="module")
async def tcp_server():
    server = KvTcpServer("127.0.0.1", 0, timeout_s=5.0)
    server.start()
    yield server
    await asyncio.to_thread(server.stop)


def _offer(transport, runner, tcp_server):
    """(KvTarget, the buffer KvReceiver reads) as a decode worker offers them for PROMPT's KV."""
    cfg = runner.config
    size = cfg.kv_bytes_per_token(4) * len(PROMPT)
    if transport == SHM:
        shm = ShmFile.create(size, tag="test")
        return pb.KvTarget(host_id=host_id(), shm_path=str(shm.path), shm_bytes=size), shm
    if transport == TCP:
        inbox = tcp_server.expect(size, (2, cfg.num_kv_heads, len(PROMPT), cfg.head_dim), cfg.num_layers)
        return pb.KvTarget(tcp_address=f"127.0.0.1:{tcp_server.port}", tcp_token=inbox.token), inbox
    return None, None


@pytest.mark.parametrize("transport", [GRPC, SHM, TCP])
async def test_every_layer_arrives_once_in_order_and_equals_the_model(stack, transport, tcp_server):
    runner = stack.prefill[0].runner
    target, shm = _offer(transport, runner, tcp_server)
    try:
        messages = await _prefill(stack, _request(target))
        kinds = _kinds(messages)
        assert kinds[0] == "head" and kinds.count("head") == 1 and kinds.count("first") == 1
        head = messages[0].head
        assert head.transport == transport
        layout = KvLayout.from_proto(head.layout)
        assert layout.num_layers == runner.config.num_layers and layout.layer_shape[2] == len(PROMPT)
        spans = [(m.kv.layer_start, m.kv.layer_end) for m in messages if m.HasField("kv")]
        covered = [layer for start, end in spans for layer in range(start, end)]
        assert covered == list(range(layout.num_layers))  # each layer once, in order
        receiver = KvReceiver(layout, transport, shm)
        got = {}
        for m in messages:
            if m.HasField("kv"):
                if transport == TCP:
                    await shm.until(m.kv.layer_end, 5.0)
                for layer, kv in receiver.layers(m.kv):
                    got[layer] = kv.clone()
        assert receiver.complete
        params = sampling_from_proto(_request().sampling)  # greedy
        want = await asyncio.to_thread(runner.prefill, [PROMPT], [params], [0])
        first = next(m.first for m in messages if m.HasField("first"))
        assert first.token_id == want[0].first_token  # greedy
        for layer in range(layout.num_layers):
            assert torch.allclose(got[layer], want[0].kv[layer], atol=1e-6), layer
    finally:
        if shm is not None:
            shm.close() if transport == TCP else shm.unlink()


async def test_layer_zero_leaves_before_the_last_layer_is_computed(stack, model):
    """The last layer's first module waits until the client holds layer 0's KV; without
    streaming the KV would only leave after the model finished, so the wait would time out."""
    arrived = threading.Event()
    seen_in_time = []

    def hold_last_layer(module, args):
        seen_in_time.append(arrived.wait(timeout=20))

    def on_message(msg):
        if msg.HasField("kv") and msg.kv.layer_start == 0:
            arrived.set()

    handle = model.layers[-1].input_layernorm.register_forward_pre_hook(hold_last_layer)
    try:
        messages = await _prefill(stack, _request(), on_message)
    finally:
        handle.remove()
    assert seen_in_time == [True]
    first_kv = next(m.kv for m in messages if m.HasField("kv"))
    assert first_kv.layer_start == 0 and first_kv.layer_end < len(model.layers)
    assert _kinds(messages).index("first") > _kinds(messages).index("kv")


class Injected(RuntimeError):
    pass


def _fail_at(model, layer: int, before_failing=lambda: None):
    def boom(module, args):
        before_failing()
        raise Injected(f"injected failure in layer {layer}")

    return model.layers[layer].input_layernorm.register_forward_pre_hook(boom)


@pytest.mark.parametrize("transport", [GRPC, SHM, TCP])
async def test_failure_mid_stream_is_internal_and_the_worker_keeps_serving(stack, model, transport, tcp_server):
    target, shm = _offer(transport, stack.prefill[0].runner, tcp_server)
    received = []
    handle = _fail_at(model, 2)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _prefill(stack, _request(target), received.append)
    finally:
        handle.remove()
        if shm is not None and transport == SHM:
            shm.unlink()
    if transport == TCP:  # the decode side learns it from the connection too, and never sees it complete
        with pytest.raises(ConnectionError, match="failed after 2 of"):
            await shm.until(shm.expected[1], 5.0)
        shm.close()
        assert not shm.complete and tcp_server.pool.idle_bytes == 0
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "after 2 of" in err.value.details() and "injected failure in layer 2" in err.value.details()
    # the layers computed before the failure were streamed; no first token was sent
    assert _kinds(received)[0] == "head" and "first" not in _kinds(received)
    assert [layer for m in received if m.HasField("kv") for layer in range(m.kv.layer_start, m.kv.layer_end)] == [0, 1]
    messages = await _prefill(stack, _request())  # the next prompt goes through
    assert _kinds(messages).count("first") == 1
    assert stack.prefill[0].active == 0


async def test_decode_worker_falls_back_and_frees_its_file_when_prefill_fails(stack, model, tiny_model, tmp_path,
                                                                            monkeypatch):
    decode = stack.decode[0]
    monkeypatch.setattr(kv_transport, "shm_dir", lambda: tmp_path)  # files of this test only (the host's are shared)
    decode.shm_pool.close()  # no reused file from an earlier test
    offered = []
    local_before = decode.kv_sources["local"]
    client = stack.openai(timeout=60)
    prompt = "the prefill worker fails in the middle of this prompt " * 2
    handle = _fail_at(model, 3, lambda: offered.extend(tmp_path.iterdir()))
    try:
        resp = await client.completions.create(
            model="tiny", prompt=prompt, max_tokens=8, temperature=0, extra_body={"return_token_ids": True},
        )
    finally:
        handle.remove()
    expected = await asyncio.to_thread(greedy_reference, tiny_model, [prompt], [8])
    assert resp.choices[0].model_extra["token_ids"] == expected[0]  # computed locally instead
    assert decode.kv_sources["local"] == local_before + 1
    assert len(offered) == 1 and offered[0].name.startswith("elastune-kv-")  # the prefill wrote into it
    assert not any(tmp_path.iterdir())  # and the decode worker removed it
    for _ in range(100):  # the engine releases the finished sequence at its next step
        if decode.engine.slots.used == 0:
            break
        await asyncio.sleep(0.02)
    assert decode.engine.slots.used == 0 and decode.engine.kv.num_used_blocks == 0


async def test_decode_worker_reuses_its_file_after_a_complete_transfer(stack, tmp_path, monkeypatch):
    decode = stack.decode[0]
    monkeypatch.setattr(kv_transport, "shm_dir", lambda: tmp_path)
    decode.shm_pool.close()
    shm_before = decode.kv_sources["shm"]
    client = stack.openai(timeout=60)
    files = []
    for prompt in ("a first prompt for the shared file " * 3, "a shorter second one"):
        await client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
        files.append(sorted(tmp_path.iterdir()))
    assert decode.kv_sources["shm"] == shm_before + 2
    assert len(files[0]) == 1 and files[1] == files[0]  # the second prompt's KV went into the same file
    decode.shm_pool.close()
    assert not any(tmp_path.iterdir())


async def test_decode_worker_drops_a_silent_prefill_call_and_computes_the_prompt(stack, model, tiny_model,
                                                                                monkeypatch):
    """A prefill worker that freezes mid-prompt (its model thread stuck) must not hold the
    request: after prefill_stall_timeout_s without a message the decode worker cancels the call
    and computes the prompt itself; the prefill worker drops the job and serves the next one."""
    decode, prefill = stack.decode[0], stack.prefill[0]
    monkeypatch.setattr(decode, "config", replace(decode.config, prefill_stall_timeout_s=0.5))
    release = threading.Event()
    stuck = threading.Event()

    def freeze(module, args):
        stuck.set()
        release.wait(30)

    handle = model.layers[1].input_layernorm.register_forward_pre_hook(freeze)
    local_before = decode.kv_sources["local"]
    client = stack.openai(timeout=60)
    prompt = "the prefill worker freezes while computing this prompt " * 2
    try:
        resp = await client.completions.create(
            model="tiny", prompt=prompt, max_tokens=6, temperature=0, extra_body={"return_token_ids": True},
        )
        assert stuck.is_set() and not release.is_set()  # answered while the prefill was still stuck
    finally:
        handle.remove()
        release.set()
    expected = await asyncio.to_thread(greedy_reference, tiny_model, [prompt], [6])
    assert resp.choices[0].model_extra["token_ids"] == expected[0]
    assert decode.kv_sources["local"] == local_before + 1
    assert prefill.active == 0  # the cancelled call let go of its job at once
    remote_before = decode.kv_sources["shm"] + decode.kv_sources["grpc"]
    await client.completions.create(model="tiny", prompt=prompt + "again", max_tokens=2, temperature=0)
    assert decode.kv_sources["shm"] + decode.kv_sources["grpc"] == remote_before + 1  # unfrozen, it serves
