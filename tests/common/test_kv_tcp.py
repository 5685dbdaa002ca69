"""The tcp KV path (services/common/kv_tcp.py) on real sockets on 127.0.0.1: KvSender (prefill
side) -> KvTcpServer / TcpInbox (decode side) -> KvReceiver. Every layer exactly once and in
order, a token is good for one announced prompt only, and a broken connection or a silent
peer gives a clear error and never a partial buffer back to the pool."""

from __future__ import annotations

import asyncio
import socket

import pytest
import pytest_asyncio
import torch

from services.common import kv_tcp
from services.common.kv_tcp import CHUNK, HELLO, MAGIC, REFUSED, REPLY, KvTcpServer, Refused
from services.common.kv_transport import TCP, KvReceiver, KvSender, layout_of
from services.proto import inference_pb2 as pb

NUM_LAYERS = 5


def _layers(t: int = 9, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, t, 8, generator=g) * (i + 1)).to(dtype) for i in range(NUM_LAYERS)]


@pytest_asyncio.fixture
async def server():
    s = KvTcpServer("127.0.0.1", 0, timeout_s=5.0)
    s.start()
    yield s
    await asyncio.to_thread(s.stop)


def _expect(server, layers):
    layout = layout_of(layers)
    return server.expect(layout.total_bytes, layout.layer_shape, layout.num_layers)


def _target(server, token: bytes) -> pb.KvTarget:
    return pb.KvTarget(host_id="another-host/boot", tcp_address=f"127.0.0.1:{server.port}", tcp_token=token)


async def _put_from_thread(sender, items) -> None:
    def work():
        for layer, kv in items:
            sender.put(layer, kv)

    await asyncio.to_thread(work)


async def _receive(sender, inbox, layout) -> tuple[list[tuple[int, int]], dict[int, torch.Tensor]]:
    """The decode worker's loop: per chunk of the stream, wait for its layers, then read them."""
    receiver = KvReceiver(layout, TCP, inbox)
    spans, got = [], {}
    while (chunk := await asyncio.wait_for(sender.next_chunk(), 10)) is not None:
        spans.append((chunk.layer_start, chunk.layer_end))
        await inbox.until(chunk.layer_end, 5.0)
        for layer, kv in receiver.layers(chunk):
            assert layer not in got
            got[layer] = kv.clone()
    assert receiver.complete
    return spans, got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
async def test_every_layer_arrives_once_in_order_and_the_buffer_is_reused(server, dtype):
    layers = _layers(dtype=dtype)
    layout = layout_of(layers)
    inbox = _expect(server, layers)
    sender = KvSender(layout, _target(server, inbox.token), torch.device("cpu"), asyncio.get_running_loop())
    assert sender.transport == TCP
    try:
        await _put_from_thread(sender, enumerate(layers))
        sender.end()
        spans, got = await _receive(sender, inbox, layout)
    finally:
        sender.close()
    covered = [layer for start, end in spans for layer in range(start, end)]
    assert covered == list(range(NUM_LAYERS))  # each layer once, in order
    assert all(torch.equal(got[i], layers[i]) for i in range(NUM_LAYERS))
    assert inbox.complete and inbox.layout == layout
    inbox.close()
    assert server.pool.idle_bytes == inbox.buffer.size and server.pending == 0


async def test_a_layer_goes_out_before_the_next_one_exists(server):
    layers = _layers(seed=1)
    layout = layout_of(layers)
    inbox = _expect(server, layers)
    sender = KvSender(layout, _target(server, inbox.token), torch.device("cpu"), asyncio.get_running_loop())
    receiver = KvReceiver(layout, TCP, inbox)
    try:
        for i, layer in enumerate(layers):  # nothing waits for the rest of the prompt
            await _put_from_thread(sender, [(i, layer)])
            chunk = await asyncio.wait_for(sender.next_chunk(), 10)
            assert (chunk.layer_start, chunk.layer_end) == (i, i + 1)
            await inbox.until(i + 1, 5.0)
            [(index, kv)] = list(receiver.layers(chunk))
            assert index == i and torch.equal(kv, layer)
        sender.end()
        assert await sender.next_chunk() is None
    finally:
        sender.close()
        inbox.close()


async def test_layers_larger_than_socket_buffers_arrive_whole(server):
    """4 MiB layers: every recv_into returns part of a layer, the receiver must keep going."""
    g = torch.Generator().manual_seed(2)
    layers = [torch.randn(2, 8, 512, 128, generator=g) for _ in range(3)]
    layout = layout_of(layers)
    inbox = _expect(server, layers)
    sender = KvSender(layout, _target(server, inbox.token), torch.device("cpu"), asyncio.get_running_loop())
    try:
        await _put_from_thread(sender, enumerate(layers))
        sender.end()
        _, got = await _receive(sender, inbox, layout)
    finally:
        sender.close()
        inbox.close()
    assert all(torch.equal(got[i], layers[i]) for i in range(3))


async def test_a_wrong_token_is_refused_and_lands_nothing(server):
    layers = _layers()
    layout = layout_of(layers)
    inbox = _expect(server, layers)
    wrong = bytes(b ^ 0xFF for b in inbox.token)
    sender = KvSender(layout, _target(server, wrong), torch.device("cpu"), asyncio.get_running_loop())
    try:
        await _put_from_thread(sender, enumerate(layers))
        sender.end()
        with pytest.raises(Refused, match="unknown or already used token"):
            await asyncio.wait_for(sender.next_chunk(), 10)
    finally:
        sender.close()
    assert inbox.received_layers == 0 and server.pending == 1  # the right token still waits for its sender
    inbox.close()
    assert server.pending == 0


async def test_a_token_is_good_for_one_connection(server):
    layers = _layers()
    layout = layout_of(layers)
    inbox = _expect(server, layers)
    first = KvSender(layout, _target(server, inbox.token), torch.device("cpu"), asyncio.get_running_loop())
    await _put_from_thread(first, enumerate(layers))
    first.end()
    await _receive(first, inbox, layout)
    second = KvSender(layout, _target(server, inbox.token), torch.device("cpu"), asyncio.get_running_loop())
    try:
        await _put_from_thread(second, enumerate(layers))
        second.end()
        with pytest.raises(Refused, match="already used"):
            await asyncio.wait_for(second.next_chunk(), 10)
    finally:
        first.close()
        second.close()
        inbox.close()


async def test_kv_of_another_shape_is_refused_and_fails_the_request(server):
    layers = _layers(t=9)
    inbox = _expect(server, layers)
    other = _layers(t=10)  # another prompt's length
    sender = KvSender(layout_of(other), _target(server, inbox.token), torch.device("cpu"), asyncio.get_running_loop())
    try:
        await _put_from_thread(sender, enumerate(other))
        sender.end()
        with pytest.raises(Refused, match="the request needs"):
            await asyncio.wait_for(sender.next_chunk(), 10)
        with pytest.raises(ConnectionError, match="after 0 of 5 layers"):
            await inbox.until(1, 5.0)
    finally:
        sender.close()
        inbox.close()
    assert server.pool.idle_bytes == 0  # never handed to another prompt


def _connect(server, token: bytes, layout) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    raw = layout.to_proto().SerializeToString()
    sock.sendall(HELLO.pack(MAGIC, token, len(raw)) + raw)
    status, n = REPLY.unpack(sock.recv(REPLY.size, socket.MSG_WAITALL))
    sock.recv(n, socket.MSG_WAITALL) if n else b""
    assert status == 0
    return sock


async def test_a_connection_dropped_mid_stream_fails_the_request_and_drops_the_buffer(server):
    layers = _layers()
    layout = layout_of(layers)
    inbox = _expect(server, layers)

    def half_then_reset():  # a prefill worker that dies after one layer
        sock = _connect(server, inbox.token, layout)
        data = layers[0].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        sock.sendall(CHUNK.pack(inbox.token, 0, 1, len(data)) + data)
        sock.sendall(CHUNK.pack(inbox.token, 1, 2, len(data)) + data[:100])  # half a header's worth of layer 1
        kv_tcp._close(sock, abort=True)

    await asyncio.to_thread(half_then_reset)
    await inbox.until(1, 5.0)  # layer 0 is whole
    with pytest.raises(ConnectionError, match="failed after 1 of 5 layers"):
        await inbox.until(NUM_LAYERS, 5.0)
    inbox.close()
    assert not inbox.complete and server.pool.idle_bytes == 0


async def test_a_chunk_out_of_order_or_with_another_token_fails_the_request(server):
    layers = _layers()
    layout = layout_of(layers)
    for bad in ("order", "token"):
        inbox = _expect(server, layers)

        def send_bad():
            sock = _connect(server, inbox.token, layout)
            data = layers[0].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            token = inbox.token if bad == "order" else bytes(16)
            start = 1 if bad == "order" else 0
            sock.sendall(CHUNK.pack(token, start, start + 1, len(data)) + data)
            with pytest.raises(ConnectionResetError):
                sock.recv(1)  # the decode side resets the connection
            sock.close()

        await asyncio.to_thread(send_bad)
        with pytest.raises(ConnectionError, match="expected one starting at layer 0" if bad == "order" else "another"):
            await inbox.until(1, 5.0)
        inbox.close()
    assert server.pool.idle_bytes == 0


async def test_the_decode_side_giving_up_stops_the_prefill_side(server):
    layers = _layers()
    layout = layout_of(layers)
    inbox = _expect(server, layers)
    sender = KvSender(layout, _target(server, inbox.token), torch.device("cpu"), asyncio.get_running_loop())
    try:
        await _put_from_thread(sender, [(0, layers[0])])
        assert (await asyncio.wait_for(sender.next_chunk(), 10)).layer_end == 1
        inbox.close()  # e.g. the client went away: the connection is reset
        for _ in range(200):  # the connection thread has ended
            if not [t for t in list(server._threads) if t.name.startswith("kv-tcp-127")]:
                break
            await asyncio.sleep(0.01)
        await _put_from_thread(sender, list(enumerate(layers))[1:])
        sender.end()
        with pytest.raises(ConnectionError, match="failed"):
            while await asyncio.wait_for(sender.next_chunk(), 10) is not None:
                pass
    finally:
        sender.close()


async def test_nobody_sending_times_out_with_a_clear_error(server):
    inbox = _expect(server, _layers())
    with pytest.raises(ConnectionError, match="no KV over tcp for 0.2 s after 0 of 5 layers"):
        await inbox.until(1, 0.2)
    inbox.close()


async def test_a_stream_that_is_not_ours_is_refused(server):
    def hello():
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            return sock.recv(REPLY.size, socket.MSG_WAITALL)

    status, _ = REPLY.unpack(await asyncio.to_thread(hello))
    assert status == REFUSED


async def test_an_unreachable_decode_worker_fails_the_stream():
    layers = _layers()
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed again: nothing listens there
    target = pb.KvTarget(tcp_address=f"127.0.0.1:{port}", tcp_token=bytes(16))
    sender = KvSender(layout_of(layers), target, torch.device("cpu"), asyncio.get_running_loop())
    try:
        with pytest.raises(ConnectionError, match=f"127.0.0.1:{port} failed"):
            await asyncio.wait_for(sender.next_chunk(), 10)
    finally:
        sender.close()


def test_target_without_a_full_token_is_not_tcp():
    from services.common.kv_transport import GRPC, choose_transport

    layout = layout_of(_layers())
    good = pb.KvTarget(tcp_address="127.0.0.1:1", tcp_token=bytes(16))
    assert choose_transport(layout, good, torch.device("cpu")) == TCP
    assert choose_transport(layout, pb.KvTarget(tcp_address="127.0.0.1:1"), torch.device("cpu")) == GRPC
