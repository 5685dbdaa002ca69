"""The skeleton every elastune gRPC service shares.

build config -> `grpc.aio.server()` -> add servicers and the standard health service ->
start -> on SIGTERM: report NOT_SERVING, drain, `stop(grace)`.
"""

from __future__ import annotations

import asyncio
import signal

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .request_context import RequestIdInterceptor

log = structlog.get_logger(__name__)

KEEPALIVE_MS = 5000  # a peer that stops answering pings for this long after one is declared gone

# KV chunks can be large; the default 4 MiB receive limit is too small for real models.
# Keepalive: a peer that froze or whose node vanished sends no RST, so without pings a token stream would
# wait for the request's whole timeout. With them, a call to a silent peer fails UNAVAILABLE within about
# 2 x KEEPALIVE_MS (the gateway then resumes the stream elsewhere), and a server drops streams of a client
# that is gone (freeing their KV). Pings only while calls are open; the server accepts them that often.
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_MS),  # what grpc core 1.85 waits for a ping's ack (default 60 s)
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),  # a server stream sends the client no data: keep pinging
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS - 1000),
]


class GrpcService:
    """Subclasses implement `add_servicers`, and optionally `on_start`, `drain` and `on_stop`."""

    name = "service"

    def __init__(self, host: str, port: int):
        self._bind = f"{host}:{port}"
        self.port = 0
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()

    def add_servicers(self, server: grpc.aio.Server) -> None:
        raise NotImplementedError

    def credentials(self) -> grpc.ServerCredentials | None:
        """TLS material for the port; None serves plaintext."""
        return None

    async def on_start(self) -> None:
        """Runs after the port is bound, before the service reports SERVING."""

    async def drain(self, grace_s: float) -> None:
        """Finish (or hand off) accepted work; called after NOT_SERVING is reported."""

    async def on_stop(self) -> None:
        """Release everything else (store connections, threads)."""

    async def start(self) -> None:
        self.server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=[RequestIdInterceptor()])
        self.add_servicers(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        creds = self.credentials()
        if creds is None:
            self.port = self.server.add_insecure_port(self._bind)
        else:
            self.port = self.server.add_secure_port(self._bind, creds)
        if self.port == 0:
            raise OSError(f"{self.name}: cannot bind {self._bind}")
        await self.server.start()
        await self.on_start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info(f"{self.name}.started", port=self.port)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            await asyncio.wait_for(self.drain(grace_s), timeout=grace_s)
        except asyncio.TimeoutError:
            log.warning(f"{self.name}.drain_timeout", grace_s=grace_s)
        if self.server is not None:
            await self.server.stop(grace=min(grace_s, 5.0))
        await self.on_stop()
        log.info(f"{self.name}.stopped")


async def run_until_signal(service, grace_s: float) -> None:
    """Start the service and stop it cleanly on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    await stop.wait()
    log.info(f"{service.name}.signal", grace_s=grace_s)
    await service.stop(grace_s)
