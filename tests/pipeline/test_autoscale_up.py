"""`elastune up --autoscale`: the scaler and the local autoscaler add decode workers under load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from services.launcher import free_port
from tests.pipeline.test_elastune_up import health

pytestmark = pytest.mark.slow


def decode_ups(events) -> list[dict]:
    if not events.exists():
        return []
    scaled = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    return [e for e in scaled if e["stage"] == "decode" and e["to"] > e["from"]]


async def load(base: str, seconds: float, events, most_s: float = 90.0) -> dict[int, int]:
    """At least `seconds` of load from 16 clients, and on (up to `most_s`) until decode scaled up:
    on a slow or busy machine the signal takes longer to build."""
    statuses: dict[int, int] = {}
    start = time.monotonic()
    body = {"model": "tiny", "prompt": "scale me " * 40, "max_tokens": 150, "ignore_eos": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        async def client():
            while True:
                spent = time.monotonic() - start
                if spent >= most_s or (spent >= seconds and decode_ups(events)):
                    break
                async with http.post(base + "/v1/completions", json=body) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1

        await asyncio.gather(*(client() for _ in range(16)))
    return statuses


def test_decode_scales_up_under_load_without_failed_requests(tmp_path, tiny_model):
    port, events = free_port(), tmp_path / "events.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    log = open(tmp_path / "up.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--autoscale", "--model", str(tiny_model), "--port", str(port),
         "--events", str(events)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while "OpenAI API" not in (tmp_path / "up.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-2000:]
            time.sleep(0.3)
        statuses = asyncio.run(load(base, 30, events))
        assert set(statuses) == {200}, statuses
        assert decode_ups(events), f"no decode scale-up in {events.read_text() if events.exists() else 'no events'}"
        assert "autoscaler: elastune-decode (decode) 1 -> " in (tmp_path / "up.log").read_text()
        deadline = time.monotonic() + 30
        while health(base)["decode"] < 2:  # the new worker loads the model and registers
            assert time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
