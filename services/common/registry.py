"""Worker registration with a heartbeat TTL, and the directory that routers read.

A worker writes its LoadReport under a key that expires after `ttl_s`, refreshed every
`interval_s`; a worker that stops reporting drops out of the directory when the key expires.

The store holds only soft state. When it restarts (empty), every heartbeat writes the whole
registration again, so workers re-register by themselves within one interval; a directory with
`hold_s` keeps routing to the workers it saw until they had that long to do so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis.asyncio as aioredis
import structlog

from . import keys
from .load_report import LoadReport
from .tasks import raise_if_cancelling, spawn, stop_task

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
        self.store_ok = True  # the last heartbeat reached the store

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
                raise_if_cancelling(exc)
                if self.store_ok:  # once per outage, not once per beat
                    log.warning("registry.store_unreachable", error=str(exc)[:200])
                self.store_ok = False
                continue
            if not self.store_ok:
                log.info("registry.registered_again")
            self.store_ok = True

    async def stop(self) -> None:
        """Stop heartbeats and leave routing at once."""
        if self._task is not None:
            await stop_task(self._task)
        report = self._report()
        try:
            await self._store.delete(keys.worker_report(self._prefix, report.worker_id))
            await self._store.srem(keys.stage_workers(self._prefix, report.stage), report.worker_id)
        except (aioredis.RedisError, OSError) as exc:
            log.warning("registry.deregister_failed", error=str(exc))


class WorkerDirectory:
    """Reads the live workers of a stage from the store.

    With `hold_s` > 0 (a router's directory; use the heartbeat TTL) a worker missing from the store
    stays listed while its last report is younger than `hold_s`, or for `hold_s` after the store was
    last unreachable: a store that restarted empty would otherwise empty the router's view for up to
    one heartbeat interval, and requests would fail although every worker is up. Draining workers are
    never held. A worker that died still leaves within `hold_s` of its last heartbeat.
    """

    def __init__(self, store: aioredis.Redis, prefix: str, hold_s: float = 0.0):
        self._store = store
        self._prefix = prefix
        self.hold_s = hold_s
        self._seen: dict[str, dict[str, tuple[LoadReport, float]]] = {}  # stage -> id -> (report, seen at)
        self._store_failed_at = float("-inf")

    async def workers(self, stage: str) -> list[LoadReport]:
        try:
            live = await self._read(stage)
        except (aioredis.RedisError, OSError):
            self._store_failed_at = time.monotonic()
            raise
        return live + self._held(stage, live) if self.hold_s > 0 else live

    async def _read(self, stage: str) -> list[LoadReport]:
        members = sorted(m.decode() for m in await self._store.smembers(keys.stage_workers(self._prefix, stage)))
        if not members:
            return []
        raw = await self._store.mget([keys.worker_report(self._prefix, m) for m in members])
        expired = [m for m, data in zip(members, raw) if data is None]
        if expired:
            await self._store.srem(keys.stage_workers(self._prefix, stage), *expired)
        return [LoadReport.from_bytes(data) for data in raw if data is not None]

    def _held(self, stage: str, live: list[LoadReport]) -> list[LoadReport]:
        now = time.monotonic()
        seen = self._seen.setdefault(stage, {})
        for w in live:
            seen[w.worker_id] = (w, now)
        present = {w.worker_id for w in live}
        recovering = now - self._store_failed_at < self.hold_s
        held = []
        for worker_id, (report, seen_at) in list(seen.items()):
            if worker_id in present:
                continue
            # the report's own age bounds the hold (as the key's TTL would); seen_at guards against skewed clocks
            fresh = time.time() - report.timestamp_unix < self.hold_s and now - seen_at < self.hold_s
            if report.draining or not (fresh or recovering):
                del seen[worker_id]
                continue
            held.append(report)
        return held
