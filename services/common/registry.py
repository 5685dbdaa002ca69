"""Worker registration with a heartbeat TTL, and the directory that routers read.

A worker writes its LoadReport under a key that expires after `ttl_s`, refreshed every
`interval_s`; a worker that stops reporting drops out of the directory when the key expires.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis
import structlog

from . import keys
from .load_report import LoadReport
from .tasks import spawn

log = structlog.get_logger(__name__)


class WorkerRegistration:
    def __init__(
        self,
        store: aioredis.Redis,
        prefix: str,
        report: Callable[[], LoadReport],
        interval_s: float = 1.0,
        ttl_s: float = 3.0,
    ):
        self._store = store
        self._prefix = prefix
        self._report = report
        self._interval_s = interval_s
        self._ttl_ms = int(ttl_s * 1000)
        self._task: asyncio.Task | None = None

    async def publish(self) -> None:
        report = self._report()
        async with self._store.pipeline(transaction=False) as pipe:
            pipe.set(keys.worker_report(self._prefix, report.worker_id), report.to_bytes(), px=self._ttl_ms)
            pipe.sadd(keys.stage_workers(self._prefix, report.stage), report.worker_id)
            await pipe.execute()

    async def start(self) -> None:
        await self.publish()
        self._task = spawn(self._heartbeat(), name="registry.heartbeat")

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.publish()
            except (aioredis.RedisError, OSError) as exc:  # store down: keep serving, retry next beat
                log.warning("registry.publish_failed", error=str(exc))

    async def stop(self) -> None:
        """Stop heartbeats and leave routing at once."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        report = self._report()
        try:
            await self._store.delete(keys.worker_report(self._prefix, report.worker_id))
            await self._store.srem(keys.stage_workers(self._prefix, report.stage), report.worker_id)
        except (aioredis.RedisError, OSError) as exc:
            log.warning("registry.deregister_failed", error=str(exc))


class WorkerDirectory:
    """Reads the live workers of a stage from the store."""

    def __init__(self, store: aioredis.Redis, prefix: str):
        self._store = store
        self._prefix = prefix

    async def workers(self, stage: str) -> list[LoadReport]:
        members = sorted(m.decode() for m in await self._store.smembers(keys.stage_workers(self._prefix, stage)))
        if not members:
            return []
        raw = await self._store.mget([keys.worker_report(self._prefix, m) for m in members])
        expired = [m for m, data in zip(members, raw) if data is None]
        if expired:
            await self._store.srem(keys.stage_workers(self._prefix, stage), *expired)
        return [LoadReport.from_bytes(data) for data in raw if data is not None]
