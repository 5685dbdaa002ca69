"""Moving a prompt's KV cache from a prefill worker to a decode worker.

Two paths, chosen from the endpoints:
- "shm": both on one host. The decode worker creates a shared-memory file sized for the
  prompt's KV and names it in the request; prefill writes each layer chunk into it and sends
  only offsets. The decode worker owns the file and unlinks it when done, whatever happens.
- "grpc": different hosts. Each chunk's bytes travel inside the gRPC message.
Each layer's KV is one contiguous tensor [2, KVH, T, D]; chunks hold whole layers.
"""

from __future__ import annotations

import mmap
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..proto import inference_pb2 as pb

SHM = "shm"
GRPC = "grpc"
MAX_CHUNK_BYTES = 4 << 20  # per gRPC message; a larger layer travels alone

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@lru_cache(maxsize=1)
def host_id() -> str:
    """Same value for every process that can share memory with this one."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "noboot"
    return f"{socket.gethostname()}/{boot}"


def shm_dir() -> Path:
    path = Path("/dev/shm")
    return path if path.is_dir() else Path(tempfile.gettempdir())


@dataclass(frozen=True)
class KvLayout:
    dtype: str
    layer_shape: tuple[int, ...]  # [2, KVH, T, D]
    num_layers: int

    @property
    def layer_bytes(self) -> int:
        n = 1
        for d in self.layer_shape:
            n *= d
        return n * torch.empty(0, dtype=DTYPES[self.dtype]).element_size()

    @property
    def total_bytes(self) -> int:
        return self.layer_bytes * self.num_layers

    def to_proto(self) -> pb.KvLayout:
        return pb.KvLayout(dtype=self.dtype, layer_shape=list(self.layer_shape), num_layers=self.num_layers)

    @classmethod
    def from_proto(cls, msg: pb.KvLayout) -> "KvLayout":
        if msg.dtype not in DTYPES:
            raise ValueError(f"KV dtype {msg.dtype!r} is not one of {', '.join(DTYPES)}")
        return cls(msg.dtype, tuple(msg.layer_shape), msg.num_layers)


def layout_of(layers: list[torch.Tensor]) -> KvLayout:
    return KvLayout(DTYPE_NAMES[layers[0].dtype], tuple(layers[0].shape), len(layers))


class ShmFile:
    """A shared-memory file mapped into this process."""

    def __init__(self, path: Path, size: int, create: bool):
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size < size:
                raise ValueError(f"shared-memory file {path} is smaller than {size} bytes")
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size

    @classmethod
    def create(cls, size: int, tag: str) -> "ShmFile":
        return cls(shm_dir() / f"elastune-kv-{tag}-{uuid.uuid4().hex[:12]}", size, create=True)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """A uint8 tensor over [offset, offset + nbytes) of the mapping (no copy)."""
        return torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes, offset=offset)

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:  # a view is still alive; the mapping goes when it does
            pass

    def unlink(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def send_chunks(layers: list[torch.Tensor], target: pb.KvTarget | None) -> tuple[str, Iterator[pb.KvChunk]]:
    """Pick the transport for a decode worker's KvTarget; return it and the chunk messages.

    layers: per layer [2, KVH, T, D] (CPU or GPU). For "shm" the data is written while the
    iterator runs, so the file holds every byte before the last chunk is sent.
    """
    layout = layout_of(layers)
    use_shm = (
        target is not None
        and target.shm_path
        and target.host_id == host_id()
        and target.shm_bytes >= layout.total_bytes
        and Path(target.shm_path).is_file()
    )
    per_chunk = max(1, MAX_CHUNK_BYTES // max(layout.layer_bytes, 1))
    if use_shm:
        return SHM, _shm_chunks(layers, Path(target.shm_path), layout, per_chunk)
    return GRPC, _grpc_chunks(layers, layout, per_chunk)


def _grpc_chunks(layers, layout: KvLayout, per_chunk: int) -> Iterator[pb.KvChunk]:
    for start in range(0, layout.num_layers, per_chunk):
        end = min(start + per_chunk, layout.num_layers)
        data = torch.cat([_as_bytes(layers[i]) for i in range(start, end)]).cpu().numpy().tobytes()
        yield pb.KvChunk(layer_start=start, layer_end=end, data=data, nbytes=len(data))


def _shm_chunks(layers, path: Path, layout: KvLayout, per_chunk: int) -> Iterator[pb.KvChunk]:
    shm = ShmFile(path, layout.total_bytes, create=False)
    try:
        for start in range(0, layout.num_layers, per_chunk):
            end = min(start + per_chunk, layout.num_layers)
            offset, nbytes = start * layout.layer_bytes, (end - start) * layout.layer_bytes
            dest = shm.view(offset, nbytes)
            dest.copy_(torch.cat([_as_bytes(layers[i]) for i in range(start, end)]).cpu())
            del dest
            yield pb.KvChunk(layer_start=start, layer_end=end, shm_offset=offset, nbytes=nbytes)
    finally:
        shm.close()


class KvReceiver:
    """Decode side: turns chunk messages back into per-layer tensors [2, KVH, T, D]."""

    def __init__(self, layout: KvLayout, transport: str, shm: ShmFile | None):
        if transport == SHM and shm is None:
            raise ValueError("prefill chose shared memory but this worker offered no file")
        self.layout = layout
        self.transport = transport
        self._shm = shm
        self.received_layers = 0

    def layers(self, chunk: pb.KvChunk) -> Iterator[tuple[int, torch.Tensor]]:
        """(layer index, tensor) for each layer in the chunk; tensors are valid until the next call."""
        if chunk.layer_start != self.received_layers or chunk.layer_end > self.layout.num_layers:
            raise ValueError(f"KV chunk for layers [{chunk.layer_start}, {chunk.layer_end}) arrived out of order")
        n = chunk.layer_end - chunk.layer_start
        if chunk.nbytes != n * self.layout.layer_bytes:
            raise ValueError(f"KV chunk has {chunk.nbytes} bytes, expected {n * self.layout.layer_bytes}")
        if self.transport == SHM:
            raw = self._shm.view(chunk.shm_offset, chunk.nbytes)
        else:
            if len(chunk.data) != chunk.nbytes:
                raise ValueError(f"KV chunk carries {len(chunk.data)} bytes but declares {chunk.nbytes}")
            raw = torch.frombuffer(bytearray(chunk.data), dtype=torch.uint8)
        dtype = DTYPES[self.layout.dtype]
        for i in range(n):
            part = raw[i * self.layout.layer_bytes : (i + 1) * self.layout.layer_bytes]
            yield chunk.layer_start + i, part.view(dtype).view(self.layout.layer_shape)
        self.received_layers = chunk.layer_end

    @property
    def complete(self) -> bool:
        return self.received_layers == self.layout.num_layers
