"""Prompt KV transport (services/common/kv_transport.py): gRPC bytes and shared-memory files."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

import pytest
import torch

from services.common import kv_transport as kt
from services.common.kv_transport import GRPC, SHM, KvLayout, KvReceiver, ShmFile, host_id, layout_of, send_chunks
from services.common.kv_wire import decode_prefill_chunk, encode_prefill_chunk
from services.proto import inference_pb2 as pb

NUM_LAYERS = 5


def _layers(dtype: torch.dtype, t: int = 9, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, t, 8, generator=g) * (i + 1)).to(dtype) for i in range(NUM_LAYERS)]


def _receive(layers, transport, chunks, shm=None):
    """Run the decode side over the chunk messages; return the chunks and copies of the layers."""
    layout = KvLayout.from_proto(layout_of(layers).to_proto())  # as carried in PrefillHead
    receiver = KvReceiver(layout, transport, shm)
    got, messages = {}, []
    for chunk in chunks:
        messages.append(chunk)
        for index, tensor in receiver.layers(chunk):
            got[index] = tensor.clone()  # valid only until the next call
    assert receiver.complete
    return messages, [got[i] for i in range(len(layers))]


@pytest.fixture
def small_chunks(monkeypatch):
    """Two layers per chunk for the 2x3x9x8 layers above, whatever their dtype."""

    def set_for(layers):
        monkeypatch.setattr(kt, "MAX_CHUNK_BYTES", 2 * layout_of(layers).layer_bytes + 1)

    return set_for


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target", ["none", "other_host"])
def test_grpc_round_trip(dtype, target, small_chunks):
    layers = _layers(dtype)
    small_chunks(layers)
    if target == "none":
        kv_target = None
    else:
        kv_target = pb.KvTarget(host_id="another-host/boot", shm_path="/nonexistent", shm_bytes=1 << 30)
    transport, chunks = send_chunks(layers, kv_target)
    assert transport == GRPC
    messages, got = _receive(layers, transport, chunks)
    assert [(m.layer_start, m.layer_end) for m in messages] == [(0, 2), (2, 4), (4, 5)]
    assert all(len(m.data) == m.nbytes > 0 for m in messages)
    for a, b in zip(got, layers):
        assert a.dtype == dtype and a.shape == b.shape
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shm_round_trip(dtype, small_chunks):
    layers = _layers(dtype, seed=1)
    small_chunks(layers)
    layout = layout_of(layers)
    shm = ShmFile.create(layout.total_bytes, tag="test")
    try:
        target = pb.KvTarget(host_id=host_id(), shm_path=str(shm.path), shm_bytes=shm.size)
        transport, chunks = send_chunks(layers, target)
        assert transport == SHM
        messages, got = _receive(layers, transport, chunks, shm)
        assert [(m.layer_start, m.layer_end) for m in messages] == [(0, 2), (2, 4), (4, 5)]
        assert [m.shm_offset for m in messages] == [0, 2 * layout.layer_bytes, 4 * layout.layer_bytes]
        assert all(m.data == b"" for m in messages)  # only offsets travel
        for a, b in zip(got, layers):
            assert a.dtype == dtype
            assert torch.equal(a, b)
    finally:
        shm.unlink()


def test_layer_larger_than_chunk_limit_travels_alone(monkeypatch):
    layers = _layers(torch.float32)
    monkeypatch.setattr(kt, "MAX_CHUNK_BYTES", 16)
    transport, chunks = send_chunks(layers, None)
    messages, got = _receive(layers, transport, chunks)
    assert [(m.layer_start, m.layer_end) for m in messages] == [(i, i + 1) for i in range(NUM_LAYERS)]
    assert all(torch.equal(a, b) for a, b in zip(got, layers))


def test_default_limit_sends_small_kv_in_one_chunk():
    layers = _layers(torch.float32)
    _, chunks = send_chunks(layers, None)
    messages = list(chunks)
    assert [(m.layer_start, m.layer_end) for m in messages] == [(0, NUM_LAYERS)]


def test_non_contiguous_layers_round_trip():
    layers = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in _layers(torch.float32)]
    assert not layers[0].is_contiguous()
    transport, chunks = send_chunks(layers, None)
    _, got = _receive(layers, transport, chunks)
    assert all(torch.equal(a, b) for a, b in zip(got, layers))


def test_shm_target_too_small_falls_back_to_grpc():
    layers = _layers(torch.float32)
    layout = layout_of(layers)
    shm = ShmFile.create(layout.total_bytes - 1, tag="test")
    try:
        target = pb.KvTarget(host_id=host_id(), shm_path=str(shm.path), shm_bytes=shm.size)
        transport, chunks = send_chunks(layers, target)
        assert transport == GRPC
        _, got = _receive(layers, transport, chunks)
        assert all(torch.equal(a, b) for a, b in zip(got, layers))
    finally:
        shm.unlink()


def test_shm_target_missing_file_falls_back_to_grpc(tmp_path):
    layers = _layers(torch.float32)
    target = pb.KvTarget(host_id=host_id(), shm_path=str(tmp_path / "gone"), shm_bytes=1 << 20)
    transport, _ = send_chunks(layers, target)
    assert transport == GRPC


def _chunks(layers, monkeypatch):
    monkeypatch.setattr(kt, "MAX_CHUNK_BYTES", 2 * layout_of(layers).layer_bytes)
    _, chunks = send_chunks(layers, None)
    return list(chunks)


def test_out_of_order_chunk_raises(monkeypatch):
    layers = _layers(torch.float32)
    first, second, third = _chunks(layers, monkeypatch)
    receiver = KvReceiver(layout_of(layers), GRPC, None)
    with pytest.raises(ValueError):
        list(receiver.layers(second))
    list(receiver.layers(first))
    with pytest.raises(ValueError):
        list(receiver.layers(first))  # a repeated chunk is out of order too
    with pytest.raises(ValueError):
        list(receiver.layers(third))
    list(receiver.layers(second))
    list(receiver.layers(third))
    assert receiver.complete


def test_chunk_past_last_layer_raises(monkeypatch):
    layers = _layers(torch.float32)
    chunks = _chunks(layers, monkeypatch)
    receiver = KvReceiver(layout_of(layers), GRPC, None)
    list(receiver.layers(chunks[0]))
    list(receiver.layers(chunks[1]))
    bad = pb.KvChunk(layer_start=4, layer_end=6, data=chunks[2].data * 2, nbytes=2 * chunks[2].nbytes)
    with pytest.raises(ValueError):
        list(receiver.layers(bad))
    assert not receiver.complete


def test_wrong_nbytes_raises(monkeypatch):
    layers = _layers(torch.float32)
    first = _chunks(layers, monkeypatch)[0]
    receiver = KvReceiver(layout_of(layers), GRPC, None)
    bad = pb.KvChunk()
    bad.CopyFrom(first)
    bad.nbytes = first.nbytes - 4
    with pytest.raises(ValueError):
        list(receiver.layers(bad))
    assert receiver.received_layers == 0
    assert len(list(receiver.layers(first))) == 2


def test_shm_transport_without_file_raises():
    layers = _layers(torch.float32)
    with pytest.raises(ValueError):
        KvReceiver(layout_of(layers), SHM, None)


def test_layout_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="int8"):
        KvLayout.from_proto(pb.KvLayout(dtype="int8", layer_shape=[2, 1, 1, 1], num_layers=1))


def test_layout_bytes():
    layout = layout_of(_layers(torch.bfloat16))
    assert layout.layer_shape == (2, 3, 9, 8)
    assert layout.layer_bytes == 2 * 3 * 9 * 8 * 2
    assert layout.total_bytes == NUM_LAYERS * layout.layer_bytes


def test_shm_unlink_removes_file():
    shm = ShmFile.create(4096, tag="test")
    assert shm.path.is_file()
    assert shm.path.stat().st_size == 4096
    view = shm.view(0, 16)
    view.fill_(3)
    del view
    shm.unlink()
    assert not shm.path.exists()
    shm.unlink()  # idempotent


def test_shm_file_opened_smaller_than_asked_raises():
    shm = ShmFile.create(100, tag="test")
    try:
        with pytest.raises(ValueError):
            ShmFile(shm.path, 200, create=False)
    finally:
        shm.unlink()


def test_grpc_chunk_with_short_data_raises_value_error():
    layers = _layers(torch.float32)
    _, chunks = send_chunks(layers, None)
    whole = next(iter(chunks))
    truncated = pb.KvChunk(layer_start=0, layer_end=NUM_LAYERS, data=whole.data[:-8], nbytes=whole.nbytes)
    receiver = KvReceiver(layout_of(layers), GRPC, None)
    with pytest.raises(ValueError):
        list(receiver.layers(truncated))


# ---- KvSender: layers handed over by a model thread, chunks taken by the event loop ----


async def _put_from_thread(sender, items) -> None:
    def work():
        for layer, kv in items:
            sender.put(layer, kv)  # never raises into the model thread

    await asyncio.to_thread(work)
    await asyncio.sleep(0)  # let the call_soon_threadsafe callbacks run


async def _drain(sender) -> list[pb.KvChunk]:
    out = []
    while (chunk := await sender.next_chunk()) is not None:
        out.append(chunk)
    return out


async def test_sender_groups_ready_layers_up_to_the_chunk_size(small_chunks):
    layers = _layers(torch.bfloat16)
    small_chunks(layers)
    sender = kt.KvSender(layout_of(layers), None, torch.device("cpu"), asyncio.get_running_loop())
    assert sender.transport == GRPC
    await _put_from_thread(sender, enumerate(layers))
    sender.end()
    wire = [decode_prefill_chunk(encode_prefill_chunk(c)) for c in await _drain(sender)]  # as sent and received
    messages, got = _receive(layers, GRPC, wire)
    assert [(m.layer_start, m.layer_end) for m in messages] == [(0, 2), (2, 4), (4, 5)]
    assert all(torch.equal(a, b) for a, b in zip(got, layers))
    assert sender.sent_layers == NUM_LAYERS


async def test_sender_sends_a_layer_as_soon_as_it_is_handed_over(tmp_path):
    layers = _layers(torch.float32)
    layout = layout_of(layers)
    shm = ShmFile(tmp_path / "kv", layout.total_bytes, create=True)
    target = pb.KvTarget(host_id=host_id(), shm_path=str(shm.path), shm_bytes=shm.size)
    sender = kt.KvSender(layout, target, torch.device("cpu"), asyncio.get_running_loop())
    receiver = KvReceiver(layout, SHM, shm)
    try:
        assert sender.transport == SHM
        for i, layer in enumerate(layers):  # one layer at a time: nothing waits for the rest
            await _put_from_thread(sender, [(i, layer)])
            chunk = await asyncio.wait_for(sender.next_chunk(), 5)
            assert (chunk.layer_start, chunk.layer_end, chunk.shm_offset) == (i, i + 1, i * layout.layer_bytes)
            [(index, tensor)] = list(receiver.layers(chunk))
            assert index == i and torch.equal(tensor, layer)
        sender.end()
        assert await sender.next_chunk() is None and receiver.complete
    finally:
        sender.close()
        shm.unlink()


async def test_sender_keeps_a_put_failure_for_the_event_loop():
    layers = _layers(torch.float32)
    sender = kt.KvSender(layout_of(layers), None, torch.device("cpu"), asyncio.get_running_loop())
    await _put_from_thread(sender, [(0, layers[0]), (2, layers[2]), (3, layers[3])])  # layer 1 skipped
    sender.end()
    with pytest.raises(ValueError, match="KV layer 2 handed over, expected layer 1"):
        await sender.next_chunk()  # the stream fails now: no point sending what is left


async def test_sender_drops_layers_after_close(tmp_path):
    layers = _layers(torch.float32)
    layout = layout_of(layers)
    shm = ShmFile(tmp_path / "kv", layout.total_bytes, create=True)
    target = pb.KvTarget(host_id=host_id(), shm_path=str(shm.path), shm_bytes=shm.size)
    sender = kt.KvSender(layout, target, torch.device("cpu"), asyncio.get_running_loop())
    sender.close()  # the request went away while the batch still computes
    await _put_from_thread(sender, enumerate(layers))
    sender.end()
    assert await sender.next_chunk() is None
    shm.unlink()


def test_shm_pool_reuses_the_smallest_fitting_file_within_its_caps(tmp_path, monkeypatch):
    monkeypatch.setattr(kt, "shm_dir", lambda: tmp_path)
    pool = kt.ShmPool(max_files=2, max_bytes=10_000)
    a, b = pool.take(4000, "a"), pool.take(2000, "b")
    pool.give_back(a)
    pool.give_back(b)
    assert pool.take(1500, "c") is b and pool.take(1500, "d") is a  # smallest that fits first
    c = pool.take(9000, "e")  # nothing idle fits: a new file
    assert c.size == 9000 and len(list(tmp_path.iterdir())) == 3
    pool.give_back(a)
    pool.give_back(c)  # 4000 + 9000 > 10_000: unlinked, not kept
    assert not c.path.exists() and pool.idle_bytes == 4000
    pool.give_back(b)
    pool.close()
    assert not any(tmp_path.iterdir())


# ---- files a killed decode worker left behind ----


def test_a_file_is_named_for_its_process(tmp_path, monkeypatch):
    monkeypatch.setattr(kt, "shm_dir", lambda: tmp_path)
    shm = ShmFile.create(4096, tag="7")
    try:
        assert shm.path.name.startswith(f"elastune-kv-{kt._pid_namespace()}-{os.getpid()}-7-")
    finally:
        shm.unlink()


def test_a_pool_removes_the_files_of_a_killed_worker_only(tmp_path, monkeypatch):
    monkeypatch.setattr(kt, "shm_dir", lambda: tmp_path)
    ns = kt._pid_namespace()
    alive = subprocess.Popen(["sleep", "60"])
    killed = subprocess.Popen(["sleep", "60"])
    try:
        alive_file = tmp_path / f"elastune-kv-{ns}-{alive.pid}-7-0123456789ab"
        killed_file = tmp_path / f"elastune-kv-{ns}-{killed.pid}-7-0123456789ab"
        others = [tmp_path / "elastune-kv-3-0123456789ab",  # the naming before pids were in it
                  tmp_path / f"elastune-kv-999-{killed.pid}-1-0123456789ab",  # another pid namespace
                  tmp_path / "unrelated"]
        for path in [alive_file, killed_file, *others]:
            path.write_bytes(b"x")
        os.kill(killed.pid, signal.SIGKILL)  # no chance to clean up
        killed.wait(timeout=10)
        pool = kt.ShmPool()  # a decode worker starting on this host
        assert pool.removed_stale == [killed_file]
        assert not killed_file.exists() and alive_file.is_file() and all(p.exists() for p in others)
        pool.close()
    finally:
        alive.kill()
        alive.wait(timeout=10)


def test_a_reused_pid_does_not_keep_a_dead_workers_file(tmp_path, monkeypatch):
    monkeypatch.setattr(kt, "shm_dir", lambda: tmp_path)
    parent = os.getppid()  # alive, and started before the file below was made...
    path = tmp_path / f"elastune-kv-{kt._pid_namespace()}-{parent}-1-0123456789ab"
    path.write_bytes(b"x")
    assert kt.ShmPool().removed_stale == []
    os.utime(path, (0, 0))  # ...unless the file predates the process: its pid was reused
    assert kt.ShmPool().removed_stale == [path]
