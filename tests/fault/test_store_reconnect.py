"""The store process killed (SIGKILL, every connection cut) and restarted empty on the same address:
registrations come back by themselves and a router's directory keeps its workers throughout."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from services.common.load_report import LoadReport
from services.common.registry import WorkerDirectory, WorkerRegistration
from services.common.store import connect
from tests.fault.harness import RestartableStore


@pytest.fixture
def store():
    s = RestartableStore()
    s.start()
    yield s
    s.stop()


def _report(worker_id: str) -> LoadReport:
    return LoadReport(worker_id=worker_id, stage="decode", address="127.0.0.1:1", host_id="h", model="tiny",
                      timestamp_unix=time.time())


async def test_registrations_and_router_view_survive_a_store_restart(store):
    workers = [connect(store.url) for _ in range(2)]
    router_client = connect(store.url)
    regs = [WorkerRegistration(c, "t", lambda i=i: _report(f"w{i}"), interval_s=0.2, ttl_s=1.0)
            for i, c in enumerate(workers)]
    router = WorkerDirectory(router_client, "t", hold_s=1.0)
    for r in regs:
        await r.start()
    try:
        assert [w.worker_id for w in await router.workers("decode")] == ["w0", "w1"]
        store.kill()
        with pytest.raises((aioredis.RedisError, OSError)):
            await router.workers("decode")
        await asyncio.sleep(0.5)
        assert not any(r.store_ok for r in regs)  # heartbeats fail, the workers keep running
        restart = asyncio.create_task(asyncio.to_thread(store.restart))
        # read as the gateway does, every 50 ms, keeping its last view while the store is unreachable
        view, views = ["w0", "w1"], []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (restart.done() and all(r.store_ok for r in regs) and len(views) > 40):
            try:
                view = [w.worker_id for w in await router.workers("decode")]
            except (aioredis.RedisError, OSError):
                pass
            views.append(view)
            await asyncio.sleep(0.05)
        await restart
        assert all(v == ["w0", "w1"] for v in views), views  # never an empty routing view
        assert all(r.store_ok for r in regs)
        plain = WorkerDirectory(router_client, "t")
        assert [w.worker_id for w in await plain.workers("decode")] == ["w0", "w1"]  # really re-registered
    finally:
        for r in regs:
            await r.stop()
        for c in workers + [router_client]:
            await c.aclose()
