"""Load client against a real local streaming HTTP server (aiohttp, OpenAI chunk shape)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from bench import loadgen
from bench.loadgen import Record
from bench.workloads import Request


@dataclass
class FakeServer:
    """Streams `max_tokens` tokens: the first after ttft_s, then tokens_per_event per event
    every tokens_per_event * token_s. status != 200 answers that status at once."""

    ttft_s: float = 0.05
    token_s: float = 0.02
    tokens_per_event: int = 1
    status: int = 200
    received: list[tuple[float, dict]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append((time.monotonic(), body))
        if self.status != 200:
            return web.Response(status=self.status, text="too many requests")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "X-Elastune-TTFT-Ms": "12.5"})
        await resp.prepare(request)
        total, sent, next_id = body["max_tokens"], 0, 100
        await asyncio.sleep(self.ttft_s)
        while sent < total:
            n = min(self.tokens_per_event, total - sent)
            if sent > 0:
                await asyncio.sleep(self.token_s * n)
            ids = list(range(next_id, next_id + n))
            next_id += n
            chunk = {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                     "choices": [{"index": 0, "text": "x" * n, "token_ids": ids,
                                  "finish_reason": None if sent + n < total else "length"}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            sent += n
        usage = {"choices": [], "usage": {"prompt_tokens": len(body["prompt"]),
                                          "completion_tokens": total}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        await resp.write_eof()
        return resp


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    fake = FakeServer()
    app = web.Application()
    app.router.add_post("/v1/completions", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.url = f"http://127.0.0.1:{port}"
    yield fake
    await runner.cleanup()


async def test_open_loop_keeps_schedule_while_server_is_slow(server: FakeServer) -> None:
    server.ttft_s, server.token_s = 0.1, 0.1  # each request streams for ~0.6 s
    reqs = [Request(0.1 * i, 8, 6) for i in range(6)]
    records = await loadgen.run(server.url, "m", reqs)
    assert [r.status for r in records] == [200] * 6
    for r in records:
        assert abs(r.lag_s) < 0.06  # tolerances leave room for a busy 2-core CI box
        assert r.sent_s == pytest.approx(r.scheduled_s, abs=0.06)
    # the last request was sent while the first was still streaming
    first = records[0]
    assert records[-1].sent_s < first.sent_s + first.e2e_s - 0.05
    arrivals = np.array([t for t, _ in server.received])
    assert arrivals - arrivals[0] == pytest.approx([0.1 * i for i in range(6)], abs=0.06)  # on the schedule
    summary = loadgen.summarize(records)
    assert summary["completed"] == 6 and summary["lag_max_ms"] < 60


async def test_ttft_and_gaps_match_server_delays(server: FakeServer) -> None:
    server.ttft_s, server.token_s, server.tokens_per_event = 0.15, 0.04, 2
    records = await loadgen.run(server.url, "tiny", [Request(0.0, 20, 8)], vocab_size=50, seed=3)
    r = records[0]
    assert r.ok and r.tokens_received == 8 and len(r.gaps_s) == 7
    assert 0.15 <= r.ttft_s < 0.25  # never before the server's delay
    # first event carries 2 tokens (one zero gap), then 3 events of 2 tokens every 0.08 s
    assert r.gaps_s[0] == 0.0
    assert r.gaps_s[1:] == pytest.approx([0.04] * 6, abs=0.03)
    assert r.e2e_s == pytest.approx(0.15 + 3 * 0.08, abs=0.08)
    assert r.hdr_ttft_ms == 12.5 and r.hdr_prefill_ms is None
    body = server.received[0][1]
    assert body["model"] == "tiny" and body["max_tokens"] == 8
    assert body["ignore_eos"] is True and body["stream"] is True and body["return_token_ids"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert len(body["prompt"]) == 20 and all(5 <= t < 50 for t in body["prompt"])
    assert body["prompt"] == loadgen.prompt_ids(0, 20, 50, 3)
    s = loadgen.summarize(records)
    assert s["ttft_p50_ms"] == pytest.approx(r.ttft_s * 1000)
    assert s["itl_p99_ms"] == pytest.approx(40, abs=30)


async def test_429_recorded_not_retried(server: FakeServer) -> None:
    server.status = 429
    records = await loadgen.run(server.url, "m", [Request(0.0, 4, 4), Request(0.02, 4, 4)])
    assert len(server.received) == 2
    assert [r.status for r in records] == [429, 429]
    assert all("too many" in r.error and r.tokens_received == 0 for r in records)
    s = loadgen.summarize(records)
    assert s["status_counts"] == {429: 2} and s["completed"] == 0 and s["ttft_p50_ms"] is None


async def test_connection_error_recorded() -> None:
    records = await loadgen.run("http://127.0.0.1:9", "m", [Request(0.0, 4, 4)], timeout_s=5)
    assert records[0].status == 0 and records[0].error and not records[0].ok


async def test_csv_round_trip(server: FakeServer, tmp_path: Path) -> None:
    records = await loadgen.run(server.url, "m", [Request(0.0, 5, 3), Request(0.01, 5, 2)])
    records.append(Record(index=2, scheduled_s=0.5, status=503, error='busy, "retry"; later'))
    path = tmp_path / "out.csv"
    loadgen.write_csv(records, path)
    back = loadgen.read_csv(path)
    assert len(back) == 3
    for a, b in zip(records, back):
        assert (a.index, a.status, a.tokens_received, a.error) == (b.index, b.status, b.tokens_received, b.error)
        assert b.gaps_s == pytest.approx(a.gaps_s, abs=1e-6)
        assert (b.ttft_s is None) == (a.ttft_s is None)
        assert b.hdr_ttft_ms == a.hdr_ttft_ms and b.hdr_kv_transfer_ms is None
    assert back[2].ttft_s is None and back[2].gaps_s == []


def test_cli_workloads() -> None:
    args = loadgen.parse_args(["--workload", "gamma", "--rate", "5", "--cv", "2", "--duration", "40"])
    reqs = loadgen.build_workload(args)
    assert 100 < len(reqs) < 300 and reqs == loadgen.build_workload(args)
    assert all(1 <= r.prompt_tokens <= 4096 and 1 <= r.output_tokens <= 1024 for r in reqs)
    for name in ("poisson", "onoff", "mmpp"):
        assert loadgen.build_workload(loadgen.parse_args(["--workload", name, "--duration", "60"]))


def test_cli_fits_synthetic_workloads_to_the_context() -> None:
    args = loadgen.parse_args(["--workload", "poisson", "--rate", "5", "--duration", "60", "--max-context", "512"])
    reqs = loadgen.build_workload(args)
    assert reqs and all(r.prompt_tokens + r.output_tokens <= 512 for r in reqs)


def test_cli_trace_replay(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    rows = [f"2023-11-16 18:00:{s:02d}.0000000,{3000 + s},500" for s in range(40)]
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    args = loadgen.parse_args(["--workload", "azure", "--trace", str(trace), "--start", "10",
                               "--duration", "5", "--rate-scale", "2", "--max-context", "1024"])
    reqs = loadgen.build_workload(args)
    assert [r.arrival_s for r in reqs] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]
    assert all(r.prompt_tokens + r.output_tokens <= 1024 for r in reqs)


async def test_wait_serving_polls_until_models_answer_and_stops_on_a_dead_stack() -> None:
    answers = [503, 200]  # the stack's HTTP server is up before its workers: first not ready

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []}, status=answers.pop(0) if answers else 200)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    alive = subprocess.Popen(["sleep", "60"])
    try:
        await loadgen.wait_serving(url, alive, timeout_s=20)
        assert answers == []  # it asked again after the 503
    finally:
        alive.kill()
        alive.wait()
        await runner.cleanup()
    dead = subprocess.Popen(["true"])
    dead.wait()
    with pytest.raises(RuntimeError, match="exited with code 0 before serving"):
        await loadgen.wait_serving(url, dead, timeout_s=20)
