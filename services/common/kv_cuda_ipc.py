"""Same-GPU KV hand-off: the decode worker exports a CUDA buffer, prefill copies into it.

The decode worker allocates a byte buffer on its GPU and names it in KvTarget.cuda_ipc (the
fields torch's own CUDA storage reduction uses, as plain protobuf rather than pickle, since
the message crosses a network boundary). A prefill worker whose KV lives on the same physical
GPU (same device UUID: indexes differ between processes with different CUDA_VISIBLE_DEVICES)
opens the buffer and copies each finished layer device-to-device; the decode worker then
copies from the buffer into its paged blocks. Untested without a GPU (tests carry the gpu marker).
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from ..proto import inference_pb2 as pb


def device_uuid(device: torch.device) -> str:
    """Identity of a physical GPU, equal in every process that sees it ("" off CUDA)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return ""
    return str(torch.cuda.get_device_properties(device).uuid)


def _local_index(uuid: str) -> int | None:
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    return None


class DeviceBuffer:
    """A uint8 CUDA tensor, owned here (decode) or opened from a peer's handle (prefill)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor  # [nbytes] uint8
        self.size = tensor.numel()

    @classmethod
    def allocate(cls, nbytes: int, device: torch.device) -> "DeviceBuffer":
        return cls(torch.empty(nbytes, dtype=torch.uint8, device=device))

    def export(self) -> pb.CudaIpcBuffer:
        storage = self.tensor.untyped_storage()
        (_, handle, size, offset, ref_handle, ref_offset, event, event_sync) = storage._share_cuda_()
        return pb.CudaIpcBuffer(
            device_uuid=device_uuid(self.tensor.device), handle=handle, storage_bytes=size, storage_offset=offset,
            ref_counter_handle=ref_handle, ref_counter_offset=ref_offset, event_handle=event or b"",
            event_sync_required=event_sync, nbytes=self.size,
        )

    @classmethod
    def open(cls, msg: pb.CudaIpcBuffer) -> "DeviceBuffer":
        index = _local_index(msg.device_uuid)
        if index is None:
            raise ValueError(f"GPU {msg.device_uuid} is not visible to this process")
        t = rebuild_cuda_tensor(
            torch.Tensor, (msg.nbytes,), (1,), 0, torch.UntypedStorage, torch.uint8, index, msg.handle,
            msg.storage_bytes, msg.storage_offset, False, msg.ref_counter_handle, msg.ref_counter_offset,
            msg.event_handle or None, msg.event_sync_required,
        )
        return cls(t)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.tensor[offset : offset + nbytes]

    def close(self) -> None:
        self.tensor = None

    def unlink(self) -> None:
        self.close()


def can_use(target: pb.KvTarget | None, device: torch.device, nbytes: int) -> bool:
    """True when the decode worker offered a buffer on the GPU this process's KV is on."""
    if target is None or not target.HasField("cuda_ipc") or device.type != "cuda":
        return False
    return target.cuda_ipc.device_uuid == device_uuid(device) and target.cuda_ipc.nbytes >= nbytes
