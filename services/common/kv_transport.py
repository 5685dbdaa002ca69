"""Moving a prompt's KV cache from a prefill worker to a decode worker.

Four paths, chosen from the endpoints:
- "cuda_ipc": both on one GPU. The decode worker exports a device buffer
  (kv_cuda_ipc.py); prefill copies each layer into it device-to-device and sends offsets.
- "shm": both on one host. The decode worker creates a shared-memory file sized for the
  prompt's KV and names it in the request; prefill writes each layer chunk into it and sends
  only offsets. The decode worker owns the file (or buffer) and frees it when done, whatever happens.
- "tcp": different hosts. The decode worker names a socket and a one-time token; prefill sends
  each layer's bytes over a plain TCP connection into a buffer set aside for the prompt
  (kv_tcp.py), and only offsets in the gRPC stream.
- "grpc": different hosts, the fallback. Each chunk's bytes travel inside the gRPC message.
Each layer's KV is one contiguous tensor [2, KVH, T, D]; chunks hold whole layers.

`KvSender` streams a prompt's KV while it is being computed: the model thread hands over
each layer as soon as it exists and the event loop sends whatever layers are ready.
`send_chunks` sends KV that already exists in full (a running sequence moving to a peer).
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
import tempfile
import threading
import uuid
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..proto import inference_pb2 as pb
from . import kv_cuda_ipc
from .kv_tcp import TOKEN_BYTES, TcpSender
from .kv_wire import KvChunkData

SHM = "shm"
GRPC = "grpc"
CUDA_IPC = "cuda_ipc"
TCP = "tcp"
SHM_PREFIX = "elastune-kv-"
MAX_CHUNK_BYTES = 4 << 20  # per gRPC message; a larger layer travels alone
SHM_POOL_FILES = 2  # idle shared-memory files a decode worker keeps for reuse
SHM_POOL_BYTES = 512 << 20  # and their total size at most (tmpfs memory: /dev/shm limits in pods)

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


def prompt_layout(dtype: torch.dtype, num_layers: int, num_kv_heads: int, head_dim: int, tokens: int) -> KvLayout:
    """The layout a prompt's KV will have, known before any layer is computed."""
    return KvLayout(DTYPE_NAMES[dtype], (2, num_kv_heads, tokens, head_dim), num_layers)


def choose_transport(layout: KvLayout, target: pb.KvTarget | None, device: torch.device) -> str:
    """cuda_ipc if the decode worker offered a buffer on our GPU, shm if it offered a file on
    our host, tcp if it offered a socket, else grpc."""
    if kv_cuda_ipc.can_use(target, device, layout.total_bytes):
        return CUDA_IPC
    use_shm = (
        target is not None
        and target.shm_path
        and target.host_id == host_id()
        and target.shm_bytes >= layout.total_bytes
        and Path(target.shm_path).is_file()
    )
    if use_shm:
        return SHM
    if target is not None and target.tcp_address and len(target.tcp_token) == TOKEN_BYTES:
        return TCP
    return GRPC


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
        """A new file named for this process (`remove_stale_files` finds it once the process is gone)."""
        name = f"{SHM_PREFIX}{_pid_namespace()}-{os.getpid()}-{tag}-{uuid.uuid4().hex[:12]}"
        return cls(shm_dir() / name, size, create=True)

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


def _pid_namespace() -> str:
    """Pids name processes only within a pid namespace (a container); files carry it too, so a
    worker never judges another container's pids."""
    try:
        return os.readlink("/proc/self/ns/pid").split("[")[-1].rstrip("]")
    except OSError:
        return "0"


def _owner_gone(pid: int, since: float) -> bool:
    """True if process `pid` no longer exists, or is a newer process that reused the pid (it
    started after `since`, the file's creation)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    try:  # pid reuse: field 22 of /proc/<pid>/stat is the start time in ticks after boot
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK") > since + 1  # 1 s: btime is whole seconds
    except (OSError, ValueError, IndexError, StopIteration):
        return False


def remove_stale_files() -> list[Path]:
    """Remove the shared-memory files that workers of this pid namespace left behind when they
    died without cleaning up (kill -9, OOM kill); returns them. Files of live processes, of other
    namespaces and of other naming schemes are left alone."""
    prefix = f"{SHM_PREFIX}{_pid_namespace()}-"
    removed = []
    for path in shm_dir().glob(prefix + "*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        try:
            if pid.isdigit() and int(pid) != os.getpid() and _owner_gone(int(pid), path.stat().st_mtime):
                path.unlink()
                removed.append(path)
        except OSError:  # removed meanwhile by its owner or another worker
            continue
    return removed


class ShmPool:
    """Decode side: shared-memory files (or tcp staging buffers, `create`) kept for the next prompt.

    The first touch of a fresh tmpfs page costs a fault and a zeroed page: two thirds of a
    256 MiB hand-off. A file goes back to the pool only after a complete transfer (no prefill
    writer can touch it any more); after a failure the caller unlinks it. Idle files keep
    their touched pages, hence the caps. A pool of files first removes the files dead workers
    of this host left behind (`remove_stale_files`): nobody else would.
    """

    def __init__(self, max_files: int = SHM_POOL_FILES, max_bytes: int = SHM_POOL_BYTES, create=None):
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._create = create or ShmFile.create
        self._idle: list = []
        self.removed_stale = remove_stale_files() if create is None else []

    def take(self, size: int, tag: str) -> ShmFile:
        """The smallest idle file that holds `size` bytes, else a new one."""
        fits = [f for f in self._idle if f.size >= size]
        if fits:
            best = min(fits, key=lambda f: f.size)
            self._idle.remove(best)
            return best
        return self._create(size, tag)

    def give_back(self, shm: ShmFile) -> None:
        if len(self._idle) < self.max_files and self.idle_bytes + shm.size <= self.max_bytes:
            self._idle.append(shm)
        else:
            shm.unlink()

    @property
    def idle_bytes(self) -> int:
        return sum(f.size for f in self._idle)

    def close(self) -> None:
        for shm in self._idle:
            shm.unlink()
        self._idle.clear()


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def send_chunks(layers: list[torch.Tensor], target: pb.KvTarget | None) -> tuple[str, Iterator[pb.KvChunk]]:
    """Pick the transport for a decode worker's KvTarget; return it and the chunk messages.

    layers: per layer [2, KVH, T, D] on CPU. For "shm" the data is written while the
    iterator runs, so the file holds every byte before the last chunk is sent.
    """
    layout = layout_of(layers)
    per_chunk = max(1, MAX_CHUNK_BYTES // max(layout.layer_bytes, 1))
    if choose_transport(layout, target, torch.device("cpu")) == SHM:
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


class KvSender:
    """Prefill side of one prompt's streamed KV hand-off.

    The model thread calls `put(layer, kv)` as each layer's KV [2, KVH, T, D] comes out of the
    model: for shm / cuda_ipc the layer is copied into the decode worker's buffer right there,
    for grpc its bytes are taken, for tcp they are queued for the sending thread. The event
    loop awaits `next_chunk()`, which returns one KvChunk over the layers handed over so far (for
    tcp: sent so far), as many as fit in MAX_CHUNK_BYTES, so a layer goes on the wire while
    later ones compute. A failure in `put` or in the tcp thread is kept, not raised into the
    model thread (the other prompts of the batch go on), and re-raised by `next_chunk()`.
    """

    def __init__(self, layout: KvLayout, target: pb.KvTarget | None, device: torch.device,
                 loop: asyncio.AbstractEventLoop):
        self.layout = layout
        self.transport = choose_transport(layout, target, device)
        self._loop = loop
        self._ready: deque[tuple[int, object]] = deque()  # (layer, grpc payload buffer), on the loop only
        self._wakeup = asyncio.Event()
        self._ended = False
        self._error: Exception | None = None
        self._next_put = 0  # model thread only
        self.sent_layers = 0  # layers put into chunks so far
        self._lock = threading.Lock()  # put() vs close(): never unmap under a copy
        self._closed = False
        self._buffer = None
        self._tcp: TcpSender | None = None
        self._tcp_sent = 0  # layers the tcp thread has sent; on the loop only
        if self.transport == TCP:
            self._tcp = TcpSender(
                target.tcp_address, target.tcp_token, layout,
                on_sent=lambda start, end: self._from_thread(self._sent, start, end),
                on_error=lambda exc: self._from_thread(self._fail, exc),
            )
        elif self.transport == SHM:
            self._buffer = ShmFile(Path(target.shm_path), layout.total_bytes, create=False)
        elif self.transport == CUDA_IPC:
            self._buffer = kv_cuda_ipc.DeviceBuffer.open(target.cuda_ipc)

    def put(self, layer: int, kv: torch.Tensor) -> None:
        """Model thread: layer `layer`'s KV exists (layers arrive in order, each once)."""
        with self._lock:
            if self._closed or self._error is not None:
                return
            try:
                if layer != self._next_put:
                    raise ValueError(f"KV layer {layer} handed over, expected layer {self._next_put}")
                raw = _as_bytes(kv)
                if raw.numel() != self.layout.layer_bytes:
                    raise ValueError(f"KV layer {layer} has {raw.numel()} bytes, expected {self.layout.layer_bytes}")
                payload = None
                if self.transport == GRPC:  # no copy: the wire encoder reads the tensor's memory
                    payload = raw.cpu().numpy()
                elif self.transport == TCP:  # no copy either: the socket reads it
                    self._tcp.put(layer, raw.cpu())
                else:
                    self._buffer.view(layer * self.layout.layer_bytes, raw.numel()).copy_(raw)
                    if self.transport == CUDA_IPC:  # the peer reads it once it has the message
                        torch.cuda.current_stream(raw.device).synchronize()
                self._next_put += 1
            except Exception as exc:
                self._loop.call_soon_threadsafe(self._fail, exc)
                self._error = exc
                return
        if self.transport != TCP:  # tcp layers count once sent (`_sent`)
            self._loop.call_soon_threadsafe(self._arrive, layer, payload)

    def _from_thread(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is streaming any more
            pass

    def _arrive(self, layer: int, payload) -> None:
        self._ready.append((layer, payload))
        self._wakeup.set()

    def _sent(self, start: int, end: int) -> None:
        self._tcp_sent = end
        for layer in range(start, end):
            self._ready.append((layer, None))
        self._wakeup.set()

    def _fail(self, exc: Exception) -> None:
        self._error = exc
        self._wakeup.set()

    def end(self) -> None:
        """Event loop: no more layers will come (the model finished or failed)."""
        self._ended = True
        self._wakeup.set()

    @property
    def pending(self) -> int:
        """Layers handed over and not yet in a chunk."""
        return len(self._ready)

    def _drained(self) -> bool:
        """Every layer handed over is in a chunk or ready for one (tcp: sent)."""
        return self.transport != TCP or self._tcp_sent == self._next_put

    async def next_chunk(self) -> KvChunkData | None:
        """The next chunk, waiting for a layer if none is ready; None once ended and drained."""
        while not self._ready and not (self._ended and self._drained()) and self._error is None:
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._error is not None:
            raise self._error
        if not self._ready:
            return None
        per_chunk = max(1, MAX_CHUNK_BYTES // max(self.layout.layer_bytes, 1))
        group = [self._ready.popleft()]
        while self._ready and len(group) < per_chunk:
            group.append(self._ready.popleft())
        start, end = group[0][0], group[-1][0] + 1
        self.sent_layers = end
        nbytes = (end - start) * self.layout.layer_bytes
        if self.transport == GRPC:
            return KvChunkData(start, end, nbytes, parts=[payload for _, payload in group])
        return KvChunkData(start, end, nbytes, shm_offset=start * self.layout.layer_bytes)

    def close(self) -> None:
        """Release the peer's buffer mapping; later puts are dropped (the peer owns the buffer)."""
        with self._lock:
            self._closed = True
            if self._tcp is not None:
                self._tcp.close()
            if self._buffer is not None:
                self._buffer.close()
                self._buffer = None


class KvReceiver:
    """Decode side: turns chunk messages back into per-layer tensors [2, KVH, T, D]."""

    def __init__(self, layout: KvLayout, transport: str, shm):
        """shm: the ShmFile (transport shm), kv_cuda_ipc.DeviceBuffer (cuda_ipc) or kv_tcp.TcpInbox
        (tcp: read a chunk only once `until` says its layers are in) this worker offered."""
        if transport not in (SHM, GRPC, CUDA_IPC, TCP):
            raise ValueError(f"KV transport {transport!r} is not one of {SHM}, {GRPC}, {CUDA_IPC}, {TCP}")
        if transport != GRPC and shm is None:
            raise ValueError(f"prefill chose {transport} but this worker offered no buffer for it")
        self.layout = layout
        self.transport = transport
        self._shm = shm
        self.received_layers = 0

    def layers(self, chunk: pb.KvChunk | KvChunkData) -> Iterator[tuple[int, torch.Tensor]]:
        """(layer index, tensor) for each layer in the chunk; tensors are valid until the next
        call, and read-only (for grpc they view the received message's bytes)."""
        if chunk.layer_start != self.received_layers or chunk.layer_end > self.layout.num_layers:
            raise ValueError(f"KV chunk for layers [{chunk.layer_start}, {chunk.layer_end}) arrived out of order")
        n = chunk.layer_end - chunk.layer_start
        if chunk.nbytes != n * self.layout.layer_bytes:
            raise ValueError(f"KV chunk has {chunk.nbytes} bytes, expected {n * self.layout.layer_bytes}")
        if self.transport != GRPC:
            if chunk.shm_offset != chunk.layer_start * self.layout.layer_bytes:
                raise ValueError(f"KV chunk offset {chunk.shm_offset} does not match layer {chunk.layer_start}")
            raw = self._shm.view(chunk.shm_offset, chunk.nbytes)
        else:
            if len(chunk.data) != chunk.nbytes:
                raise ValueError(f"KV chunk carries {len(chunk.data)} bytes but declares {chunk.nbytes}")
            with warnings.catch_warnings():  # read-only bytes: we only ever copy out of them
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                raw = torch.frombuffer(chunk.data, dtype=torch.uint8)
        dtype = DTYPES[self.layout.dtype]
        for i in range(n):
            part = raw[i * self.layout.layer_bytes : (i + 1) * self.layout.layer_bytes]
            yield chunk.layer_start + i, part.view(dtype).view(self.layout.layer_shape)
        self.received_layers = chunk.layer_end

    @property
    def complete(self) -> bool:
        return self.received_layers == self.layout.num_layers
