"""Same-GPU KV hand-off (services/common/kv_cuda_ipc.py): chosen only for a buffer on this
process's GPU; between two processes on a GPU, every layer lands in the decode side's buffer."""

from __future__ import annotations

import asyncio
import multiprocessing

import pytest
import torch

from services.common.kv_transport import CUDA_IPC, GRPC, SHM, KvLayout, KvReceiver, KvSender, choose_transport, host_id
from services.common.kv_wire import decode_prefill_chunk, encode_prefill_chunk
from services.proto import inference_pb2 as pb

LAYOUT = KvLayout("bfloat16", (2, 2, 33, 64), 6)


def _layers(device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(*LAYOUT.layer_shape, generator=g).to(torch.bfloat16).to(device) for _ in range(LAYOUT.num_layers)]


def test_cuda_ipc_is_not_chosen_for_kv_on_the_cpu(tmp_path):
    target = pb.KvTarget(host_id=host_id(), cuda_ipc=pb.CudaIpcBuffer(device_uuid="GPU-x", handle=b"h", nbytes=1 << 30))
    assert choose_transport(LAYOUT, target, torch.device("cpu")) == GRPC
    path = tmp_path / "kv"
    path.write_bytes(b"\0" * LAYOUT.total_bytes)
    target.shm_path, target.shm_bytes = str(path), LAYOUT.total_bytes
    assert choose_transport(LAYOUT, target, torch.device("cpu")) == SHM


def _prefill_side(target_bytes: bytes, conn) -> None:
    """Child process: stream the layers into the exported buffer; send back the chunk messages."""

    async def run() -> list[bytes]:
        target = pb.KvTarget.FromString(target_bytes)
        sender = KvSender(LAYOUT, target, torch.device("cuda"), asyncio.get_running_loop())
        assert sender.transport == CUDA_IPC
        for i, kv in enumerate(_layers("cuda")):
            sender.put(i, kv)
        sender.end()
        out = []
        while (chunk := await sender.next_chunk()) is not None:
            out.append(encode_prefill_chunk(chunk))
        sender.close()
        return out

    conn.send(asyncio.run(run()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_layers_cross_processes_device_to_device():
    from services.common.kv_cuda_ipc import DeviceBuffer

    buffer = DeviceBuffer.allocate(LAYOUT.total_bytes, torch.device("cuda"))
    target = pb.KvTarget(host_id=host_id())
    target.cuda_ipc.CopyFrom(buffer.export())
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_prefill_side, args=(target.SerializeToString(), child))
    proc.start()
    messages = parent.recv()
    proc.join(timeout=60)
    assert proc.exitcode == 0
    receiver = KvReceiver(LAYOUT, CUDA_IPC, buffer)
    got = {}
    for raw in messages:
        for layer, kv in receiver.layers(decode_prefill_chunk(raw)):
            got[layer] = kv.clone()
    assert receiver.complete
    for layer, want in enumerate(_layers("cuda")):
        assert got[layer].device.type == "cuda" and torch.equal(got[layer], want)
    buffer.unlink()
