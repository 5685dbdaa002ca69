"""`elastune up --tune`: one sidecar process per worker, each applying the table's config."""

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


def point(model: str, stage: str, share: float, config: dict, thr: float) -> ProfilePoint:
    return ProfilePoint(model=model, stage=stage, device="cpu", share=share, config=config,
                        throughput_tokens_per_s=thr, latency_p50_ms=5.0, latency_p95_ms=6.0, samples=5)


async def configs(store_url: str, prefix: str) -> dict[str, tuple[int, int, float]]:
    store = connect(store_url)
    try:
        d = WorkerDirectory(store, prefix)
        return {w.stage: (w.config.max_batch_size, w.config.max_concurrency, w.gpu_share)
                for stage in ("prefill", "decode") for w in await d.workers(stage)}
    finally:
        await store.aclose()


def test_up_tune_starts_a_sidecar_per_worker_that_applies_the_table(tmp_path, tiny_model) -> None:
    prefix = "elastune"  # the launcher's default prefix: use a store of our own
    store_proc = subprocess.Popen([sys.executable, "-m", "services.cli", "store"], stdout=subprocess.PIPE, text=True)
    url = store_proc.stdout.readline().strip()
    share = min(1.0, 1 / (os.cpu_count() or 1)) if (os.cpu_count() or 1) >= 2 else 1.0
    decode_best = {"max_batch_size": 3, "max_concurrency": 5}
    prefill_best = {"max_batch_size": 2}

    async def seed():
        store = connect(url)
        try:
            await TuningTable.update(store, prefix, [
                point(tiny_model.name, "decode", share, decode_best, 900.0),
                point(tiny_model.name, "decode", share, {"max_batch_size": 32, "max_concurrency": 32}, 100.0),
                point(tiny_model.name, "prefill", share, prefill_best, 5000.0),
                point(tiny_model.name, "prefill", share, {"max_batch_size": 8}, 100.0),
            ])
        finally:
            await store.aclose()

    asyncio.run(seed())
    port = free_port()
    log = open(tmp_path / "up.log", "w+")
    env = {**os.environ, "REDIS_URL": url, "ELASTUNE_INTERVAL_S": "0.2"}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--model", str(tiny_model), "--tune",
                             "--port", str(port), "--threads", "1"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        want = {"decode": (3, 5, share), "prefill": (2, 0, share)}  # prefill: max_concurrency is not tuned
        seen = {}
        while time.monotonic() < deadline:
            seen = asyncio.run(configs(url, prefix))
            if {k: v[:1] + v[2:] for k, v in seen.items()} == {k: v[:1] + v[2:] for k, v in want.items()}:
                break
            assert proc.poll() is None, open(tmp_path / "up.log").read()[-3000:]
            time.sleep(0.5)
        assert seen.get("decode") == want["decode"], (seen, open(tmp_path / "up.log").read()[-3000:])
        assert seen.get("prefill", (0,))[0] == 2
        assert len(children(proc.pid, "tuner")) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        store_proc.terminate()
        store_proc.wait(timeout=10)
    assert children(proc.pid, "tuner") == []
