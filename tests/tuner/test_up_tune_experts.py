"""`elastune up --tune` on an MoE model: the experts server gets its own sidecar, which applies
the table's expert micro-batch."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from services.common.registry import WorkerDirectory
from services.common.store import connect
from services.launcher import free_port
from services.tuner.table import ProfilePoint, TuningTable
from tests.pipeline.test_elastune_up import children

pytestmark = pytest.mark.slow


async def micro_batch(store_url: str, prefix: str) -> int | None:
    store = connect(store_url)
    try:
        servers = await WorkerDirectory(store, prefix).workers("experts/g0")
        return servers[0].config.max_batch_size if servers else None
    finally:
        await store.aclose()


def test_up_tune_gives_the_experts_server_a_sidecar_that_applies_the_tables_micro_batch(tmp_path,
                                                                                       tiny_moe_model) -> None:
    prefix = "elastune"  # the launcher's default prefix: use a store of our own
    store_proc = subprocess.Popen([sys.executable, "-m", "services.cli", "store"], stdout=subprocess.PIPE, text=True)
    url = store_proc.stdout.readline().strip()
    # --threads 1 on this machine: every worker reports share 1 / cores
    share = min(1.0, 1 / (os.cpu_count() or 1))

    def point(micro_batch: int, thr: float) -> ProfilePoint:
        return ProfilePoint(model=tiny_moe_model.name, stage="experts", device="cpu", share=share,
                            config={"max_batch_size": micro_batch}, throughput_tokens_per_s=thr,
                            latency_p50_ms=5.0, latency_p95_ms=6.0, samples=5, workload={"call_tokens": 256})

    async def seed():
        store = connect(url)
        try:
            await TuningTable.update(store, prefix, [point(48, 9000.0), point(16, 4000.0)])
        finally:
            await store.aclose()

    asyncio.run(seed())
    log = open(tmp_path / "up.log", "w+")
    env = {**os.environ, "REDIS_URL": url, "ELASTUNE_INTERVAL_S": "0.2"}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--model", str(tiny_moe_model), "--tune",
                             "--experts", "1", "--port", str(free_port()), "--threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 150
        seen = None
        while time.monotonic() < deadline and seen != 48:
            assert proc.poll() is None, open(tmp_path / "up.log").read()[-3000:]
            time.sleep(0.5)
            seen = asyncio.run(micro_batch(url, prefix))
        assert seen == 48, open(tmp_path / "up.log").read()[-3000:]
        assert len(children(proc.pid, "tuner")) == 3  # prefill, decode and the expert group g0
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        store_proc.terminate()
        store_proc.wait(timeout=10)
    assert children(proc.pid, "tuner") == []
