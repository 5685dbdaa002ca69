"""The "tcp" KV path: a prompt's KV over one plain TCP connection, for workers on different hosts.

gRPC copies every message's bytes several times on each side (framing, HTTP/2 buffers, the
Python objects); a socket carries a layer from the prefill worker's tensor (`sendall` of its
memory) into a buffer the decode worker set aside for the prompt (`recv_into`), at the rate the
kernel copies. Blocking sockets on threads: faster here than asyncio's BufferedProtocol or
`sock_recv_into` (bench/kv_tcp_io.py), and the event loop never touches a byte.

One connection per prompt, prefill -> decode, little-endian:
  hello  b"EKV1", token[16], u32 n, KvLayout protobuf[n]
  reply  u8 status (0 accepted, 1 refused), u16 n, reason utf-8[n]          (decode -> prefill)
  chunk  token[16], u32 layer_start, u32 layer_end, u64 nbytes, then nbytes of KV; repeated
The decode worker issues the token in the KvTarget of its Prefill call and accepts it once, so a
connection's bytes can only land in the buffer of the prompt announced with it. Chunks hold whole
layers, in order, each once. The Prefill gRPC stream still carries the head, the first token and
a KvChunk (offset only) per group of layers sent; the decode worker waits until those layers are
in its buffer (`TcpInbox.until`), then adopts them, as it does for shared memory.
"""

from __future__ import annotations

import asyncio
import queue
import secrets
import socket
import struct
import threading
from collections.abc import Callable

import structlog
import torch

from ..proto import inference_pb2 as pb

log = structlog.get_logger(__name__)

MAGIC = b"EKV1"
TOKEN_BYTES = 16
HELLO = struct.Struct("<4s16sI")
REPLY = struct.Struct("<BH")
CHUNK = struct.Struct("<16sIIQ")
ACCEPTED, REFUSED = 0, 1
MAX_LAYOUT_BYTES = 4096
HELLO_TIMEOUT_S = 10.0  # a connection that does not say who it is within this is dropped
SEND_TIMEOUT_S = 30.0  # prefill side: connecting, and each send, at most this long
CHUNK_BYTES = 32 << 20  # layers ready together go under one header, up to this many bytes


class Refused(ConnectionError):
    """The decode worker turned the connection down: unknown or used token, or a wrong layout."""


def _recv_exact(sock: socket.socket, into: memoryview) -> None:
    got = 0
    while got < len(into):
        n = sock.recv_into(into[got:])
        if n == 0:
            raise ConnectionError("the peer closed the connection")
        got += n


def _close(sock: socket.socket, abort: bool) -> None:
    """abort: reset (RST) rather than a clean end, so the peer's next send fails at once."""
    try:
        if abort:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class StagingBuffer:
    """Memory a tcp hand-off lands in; pooled by the decode worker (ShmPool) because a fresh
    page costs a fault and a zeroing on first touch, as for the shm files."""

    def __init__(self, size: int):
        self.size = size
        self._tensor: torch.Tensor | None = torch.empty(size, dtype=torch.uint8)  # untouched until received into

    @classmethod
    def create(cls, size: int, tag: str) -> "StagingBuffer":
        return cls(size)

    def memory(self) -> memoryview:
        return memoryview(self._tensor.numpy())

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self._tensor[offset : offset + nbytes]

    def unlink(self) -> None:
        """Drop the memory (the pool's name for freeing); a thread still receiving into it keeps it alive."""
        self._tensor = None


class TcpInbox:
    """Decode side of one prompt's tcp hand-off: where its bytes land and how far they got.

    The connection's thread fills the buffer and counts whole layers; the event loop waits with
    `until()` and reads counted layers with `view()` (as KvReceiver's buffer).
    """

    def __init__(self, server: "KvTcpServer", token: bytes, buffer: StagingBuffer,
                 layer_shape: tuple[int, ...], num_layers: int, loop: asyncio.AbstractEventLoop):
        self.token = token
        self.buffer = buffer
        self.expected = (tuple(layer_shape), num_layers)
        self.layout = None  # KvLayout, from the hello
        self.received_layers = 0  # whole layers in the buffer; written by the connection thread only
        self._server = server
        self._loop = loop
        self._changed = asyncio.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._error: Exception | None = None
        self._closed = False

    # ---- the connection thread ----

    def _attach(self, sock: socket.socket, layout) -> str | None:
        """Take the connection; returns why not, if not."""
        shape, layers = self.expected
        with self._lock:
            if self._closed:
                return "the request this token was issued for is gone"
            if (layout.layer_shape, layout.num_layers) != (shape, layers):
                return f"KV of {layout.num_layers} x {list(layout.layer_shape)}, the request needs {layers} x {list(shape)}"
            if layout.total_bytes > self.buffer.size:
                return f"KV of {layout.total_bytes} bytes, the buffer holds {self.buffer.size}"
            self.layout, self._sock = layout, sock
        return None

    def _progress(self, layers: int) -> None:
        self.received_layers = layers
        self._notify()

    def _detach(self, error: Exception | None) -> None:
        with self._lock:
            self._sock = None
            if error is not None and self._error is None:
                self._error = error
        self._notify()

    def _notify(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._changed.set)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    # ---- the event loop ----

    @property
    def complete(self) -> bool:
        return self.layout is not None and self.received_layers == self.layout.num_layers

    async def until(self, layers: int, timeout_s: float) -> None:
        """Return once the first `layers` layers are in the buffer; ConnectionError if the
        connection failed first or nothing moved for timeout_s."""
        while self.received_layers < layers:
            if self._error is not None:
                raise ConnectionError(
                    f"KV over tcp failed after {self.received_layers} of {self.expected[1]} layers: {self._error}")
            self._changed.clear()
            before = self.received_layers
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                if self.received_layers == before and self._error is None:
                    raise ConnectionError(
                        f"no KV over tcp for {timeout_s} s after {before} of {self.expected[1]} layers") from None

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.buffer.view(offset, nbytes)

    def close(self) -> None:
        """The request is done with this hand-off. A complete buffer goes back to the pool (its
        thread writes no more into it); an incomplete one is dropped, since a connection thread
        may still write into it, and its connection is shut, so the thread and the prefill
        worker's next send fail at once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sock, self._sock = self._sock, None
        self._server._forget(self.token)
        if self.complete:
            self._server.pool.give_back(self.buffer)
        elif sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class KvTcpServer:
    """Decode side: the socket prefill workers stream KV into, one thread per connection."""

    def __init__(self, host: str, port: int = 0, timeout_s: float = 30.0, pool=None):
        from .kv_transport import ShmPool  # kv_transport imports this module for the prefill side

        self.host = host
        self.timeout_s = timeout_s  # a connection idle this long mid-transfer fails its request
        self.pool = pool or ShmPool(create=StagingBuffer.create)
        self.port = port
        self._expected: dict[bytes, TcpInbox] = {}
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = False

    def start(self) -> int:
        self._listener = socket.create_server((self.host, self.port), backlog=128)
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept_loop, "kv-tcp-accept")
        return self.port

    def expect(self, size: int, layer_shape: tuple[int, ...], num_layers: int) -> TcpInbox:
        """Event loop: set aside a buffer for one prompt's KV and issue the token its sender must show."""
        token = secrets.token_bytes(TOKEN_BYTES)
        inbox = TcpInbox(self, token, self.pool.take(size, tag="tcp"), layer_shape, num_layers,
                         asyncio.get_running_loop())
        with self._lock:
            self._expected[token] = inbox
        return inbox

    def _forget(self, token: bytes) -> None:
        with self._lock:
            self._expected.pop(token, None)

    @property
    def pending(self) -> int:
        """Tokens issued and not yet used or given up."""
        return len(self._expected)

    def reset_connections(self) -> int:
        """Shut every open connection (their requests fail and compute the prompt locally);
        returns how many there were."""
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(connections)

    def stop(self) -> None:
        self._stopping = True
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            except OSError:
                pass
            self._listener.close()
        self.reset_connections()  # wakes threads blocked in recv
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=2)
        self.pool.close()

    def _spawn(self, target, name: str, *args) -> None:
        thread = threading.Thread(target=self._run, args=(target, *args), name=name, daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _run(self, target, *args) -> None:
        try:
            target(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                if self._stopping:
                    return
                continue
            self._spawn(self._serve, f"kv-tcp-{peer[0]}:{peer[1]}", conn)

    def _serve(self, conn: socket.socket) -> None:
        inbox = None
        error: Exception | None = None
        with self._lock:
            self._connections.add(conn)
        try:
            conn.settimeout(HELLO_TIMEOUT_S)
            inbox, layout = self._hello(conn)
            if inbox is None:
                return
            conn.sendall(REPLY.pack(ACCEPTED, 0))
            conn.settimeout(self.timeout_s)
            self._receive(conn, inbox, layout)
        except (OSError, ValueError) as exc:
            error = exc
        finally:
            with self._lock:
                self._connections.discard(conn)
            if inbox is not None:
                inbox._detach(error)
            if error is not None:
                log.warning("kv_tcp.connection_failed", error=str(error)[:200])
            _close(conn, abort=error is not None)

    def _hello(self, conn: socket.socket):
        from .kv_transport import KvLayout

        head = bytearray(HELLO.size)
        _recv_exact(conn, memoryview(head))
        magic, token, n = HELLO.unpack(head)
        if magic != MAGIC or n > MAX_LAYOUT_BYTES:
            return self._refuse(conn, "not an elastune KV stream")
        raw = bytearray(n)
        _recv_exact(conn, memoryview(raw))
        try:
            layout = KvLayout.from_proto(pb.KvLayout.FromString(bytes(raw)))
        except Exception as exc:  # a protobuf DecodeError or an unknown dtype: a bad hello either way
            return self._refuse(conn, f"bad KV layout: {exc}")
        with self._lock:
            inbox = self._expected.pop(token, None)  # once: a second connection with it is refused
        if inbox is None:
            return self._refuse(conn, "unknown or already used token")
        reason = inbox._attach(conn, layout)
        if reason is not None:
            inbox._detach(Refused(reason))
            return self._refuse(conn, reason)
        return inbox, layout

    @staticmethod
    def _refuse(conn: socket.socket, reason: str):
        text = reason.encode()[:1000]
        conn.sendall(REPLY.pack(REFUSED, len(text)) + text)
        log.warning("kv_tcp.refused", reason=reason)
        return None, None

    @staticmethod
    def _receive(conn: socket.socket, inbox: TcpInbox, layout) -> None:
        header = bytearray(CHUNK.size)
        memory = inbox.buffer.memory()
        step = layout.layer_bytes
        done = 0
        while done < layout.num_layers:
            _recv_exact(conn, memoryview(header))
            token, start, end, nbytes = CHUNK.unpack(header)
            if token != inbox.token:
                raise ValueError("a KV chunk carries another request's token")
            if start != done or not start < end <= layout.num_layers:
                raise ValueError(f"KV chunk for layers [{start}, {end}), expected one starting at layer {done}")
            if nbytes != (end - start) * step:
                raise ValueError(f"KV chunk declares {nbytes} bytes, layers [{start}, {end}) hold {(end - start) * step}")
            _recv_exact(conn, memory[start * step : end * step])
            done = end
            inbox._progress(done)


class TcpSender:
    """Prefill side: a thread that connects to the decode worker and sends each layer handed over.

    `put` (model thread) only queues the layer's bytes; the thread sends whatever is queued under
    one header and reports each sent group with `on_sent(start, end)`, a failure with
    `on_error(exc)` (both called on the thread).
    """

    def __init__(self, address: str, token: bytes, layout, on_sent: Callable[[int, int], None],
                 on_error: Callable[[Exception], None], timeout_s: float = SEND_TIMEOUT_S):
        self.address = address
        self.token = token
        self.layout = layout
        self._on_sent = on_sent
        self._on_error = on_error
        self._timeout_s = timeout_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._closed = False
        self._finished = False  # every layer is in the kernel's hands: a close must not reset it
        self._thread = threading.Thread(target=self._run, name="kv-tcp-send", daemon=True)
        self._thread.start()

    def put(self, layer: int, raw: torch.Tensor) -> None:
        """raw: the layer's bytes, a contiguous uint8 CPU tensor (kept, not copied)."""
        self._queue.put((layer, raw))

    def close(self) -> None:
        """Stop sending; a send in progress fails at once (the decode worker sees the connection end)."""
        with self._lock:
            self._closed = True
            sock = self._sock
            if sock is not None and not self._finished:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._queue.put(None)

    def _run(self) -> None:
        sock = None
        try:
            host, _, port = self.address.rpartition(":")
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=self._timeout_s)
            with self._lock:
                if self._closed:
                    return
                self._sock = sock
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a header must not wait for an ack
            self._handshake(sock)
            self._send_all(sock)
        except (OSError, ValueError) as exc:
            if not self._closed:
                if not isinstance(exc, Refused):
                    exc = ConnectionError(f"KV over tcp to {self.address} failed: {exc!r}")
                self._on_error(exc)
        finally:
            with self._lock:
                self._sock = None
                abort = self._closed and not self._finished
            if sock is not None:
                _close(sock, abort=abort)

    def _handshake(self, sock: socket.socket) -> None:
        layout = self.layout.to_proto().SerializeToString()
        sock.sendall(HELLO.pack(MAGIC, self.token, len(layout)) + layout)
        reply = bytearray(REPLY.size)
        _recv_exact(sock, memoryview(reply))
        status, n = REPLY.unpack(reply)
        reason = bytearray(n)
        _recv_exact(sock, memoryview(reason))
        if status != ACCEPTED:
            raise Refused(f"the decode worker at {self.address} refused the KV connection: {reason.decode(errors='replace')}")

    def _send_all(self, sock: socket.socket) -> None:
        per_chunk = max(1, CHUNK_BYTES // max(self.layout.layer_bytes, 1))
        sent = 0
        while sent < self.layout.num_layers:
            item = self._queue.get()
            if item is None:
                return
            group = [item]
            while len(group) < per_chunk:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    return
                group.append(item)
            start, end = group[0][0], group[-1][0] + 1
            nbytes = sum(raw.numel() for _, raw in group)
            sock.sendall(CHUNK.pack(self.token, start, end, nbytes))
            for _, raw in group:
                sock.sendall(memoryview(raw.numpy()))
            sent = end
            if sent == self.layout.num_layers:
                with self._lock:
                    self._finished = True
            self._on_sent(start, end)
