"""Load client in gRPC mode (and HTTP stage timings): against the real gateway (tiny model) and a
scripted gRPC server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench import loadgen
from bench.workloads import Request
from services.proto import inference_pb2 as pb
from services.proto import inference_pb2_grpc as pb_grpc
from tests.stack import start_stack


@dataclass
class ScriptedGateway(pb_grpc.GatewayServicer):
    """Streams max_tokens tokens (first after ttft_s, then one every token_s), or aborts with `abort`."""

    ttft_s: float = 0.05
    token_s: float = 0.02
    abort: grpc.StatusCode | None = None
    received: list[tuple[float, pb.GenerateRequest]] = field(default_factory=list)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        self.received.append((time.monotonic(), request))
        if self.abort is not None:
            await context.abort(self.abort, "scripted refusal; retry in 1 s")
        await asyncio.sleep(self.ttft_s)
        for i in range(request.sampling.max_tokens):
            if i:
                await asyncio.sleep(self.token_s)
            msg = pb.GenerateResponse(token_ids=[100 + i], text="x")
            if i == request.sampling.max_tokens - 1:
                msg.finish_reason = "length"
                msg.timings.prefill_queue_ms, msg.timings.prefill_compute_ms = 1.5, 2.5
                msg.timings.kv_transfer_ms, msg.timings.decode_queue_ms = 0.5, 0.25
            yield msg


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedGateway, str]]:
    servicer = ScriptedGateway()
    server = grpc.aio.server()
    pb_grpc.add_GatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


async def test_grpc_open_loop_keeps_schedule_while_server_is_slow(scripted) -> None:
    servicer, address = scripted
    servicer.ttft_s, servicer.token_s = 0.1, 0.1  # each request streams for ~0.6 s
    reqs = [Request(0.1 * i, 8, 6) for i in range(6)]
    records = await loadgen.run(address, "m", reqs, api="grpc")
    assert [(r.status, r.grpc_code) for r in records] == [(200, "OK")] * 6
    assert all(abs(r.lag_s) < 0.06 for r in records)  # room for a busy 2-core CI box
    first = records[0]
    assert records[-1].sent_s < first.sent_s + first.e2e_s - 0.05  # sent while the first still streamed
    arrivals = np.array([t for t, _ in servicer.received])
    assert arrivals - arrivals[0] == pytest.approx([0.1 * i for i in range(6)], abs=0.06)  # on the schedule
    r = first
    assert r.tokens_received == 6 and len(r.gaps_s) == 5
    assert 0.1 <= r.ttft_s < 0.2 and r.gaps_s == pytest.approx([0.1] * 5, abs=0.05)
    # stage timings come from the last message, as the HTTP API's headers do
    assert (r.hdr_prefill_ms, r.hdr_kv_transfer_ms, r.hdr_decode_queue_ms) == (4.0, 0.5, 0.25)
    sent = servicer.received[0][1]
    assert sent.model == "m" and sent.sampling.max_tokens == 6 and sent.sampling.ignore_eos
    assert list(sent.prompt_token_ids) == loadgen.prompt_ids(0, 8, 32000, 0)


async def test_grpc_refusals_map_to_http_statuses_and_round_trip(scripted, tmp_path: Path) -> None:
    servicer, address = scripted
    servicer.abort = grpc.StatusCode.RESOURCE_EXHAUSTED
    records = await loadgen.run(address, "m", [Request(0.0, 4, 4), Request(0.02, 4, 4)], api="grpc")
    assert len(servicer.received) == 2  # recorded, not retried
    assert [(r.status, r.grpc_code) for r in records] == [(429, "RESOURCE_EXHAUSTED")] * 2
    assert all("retry in 1 s" in r.error and r.tokens_received == 0 and not r.ok for r in records)
    gone = await loadgen.run("127.0.0.1:9", "m", [Request(0.0, 4, 4)], api="grpc", timeout_s=5)
    assert (gone[0].status, gone[0].grpc_code) == (503, "UNAVAILABLE")
    path = tmp_path / "grpc.csv"
    loadgen.write_csv(records + gone, path)
    back = loadgen.read_csv(path)
    assert [(r.status, r.grpc_code, r.error) for r in back] == [(r.status, r.grpc_code, r.error)
                                                                 for r in records + gone]
    assert loadgen.summarize(back)["status_counts"] == {429: 2, 503: 1}


async def test_grpc_mode_against_the_real_gateway(store_url, tiny_model) -> None:
    stack = await start_stack(store_url, tiny_model)
    try:
        vocab = stack.gateway.tokenizer.vocab_size
        reqs = [Request(0.05 * i, 12, 5 + i) for i in range(4)]
        records = await loadgen.run(stack.grpc_address, "", reqs, vocab_size=vocab, api="grpc", timeout_s=60)
        for req, r in zip(reqs, records):
            assert r.ok and r.grpc_code == "OK", r.error
            assert r.tokens_received == req.output_tokens and len(r.gaps_s) == req.output_tokens - 1
            assert 0 < r.ttft_s <= r.e2e_s and r.hdr_prefill_ms is not None and r.hdr_prefill_ms > 0
        text = await loadgen.run(stack.grpc_address, "", [Request(0.0, 6, 3)], text_prompts=True, api="grpc")
        assert text[0].ok and text[0].tokens_received == 3
        # ids past the model's vocabulary: the gateway answers INVALID_ARGUMENT, recorded as 400
        bad = await loadgen.run(stack.grpc_address, "", [Request(0.0, 8, 2)], vocab_size=10**6, seed=1,
                                api="grpc")
        assert (bad[0].status, bad[0].grpc_code) == (400, "INVALID_ARGUMENT") and "vocab" in bad[0].error
        s = loadgen.summarize(records)
        assert s["completed"] == 4 and s["tokens_per_s"] > 0
        # HTTP streaming: the headers leave before any stage ran; the timings come in the usage event
        http = await loadgen.run(stack.base_url, "tiny", reqs[:2], vocab_size=vocab, timeout_s=60)
        for r in http:
            assert r.ok and r.hdr_prefill_ms is not None and r.hdr_prefill_ms > 0, r
            assert r.hdr_kv_transfer_ms is not None and r.hdr_decode_queue_ms is not None
            assert 0 < r.hdr_ttft_ms <= r.e2e_s * 1000
    finally:
        await stack.stop()


def test_cli_takes_the_api() -> None:
    args = loadgen.parse_args(["--api", "grpc", "--url", "127.0.0.1:5000"])
    assert args.api == "grpc" and args.url == "127.0.0.1:5000"
    with pytest.raises(ValueError, match="api"):
        asyncio.run(loadgen.run("x", "m", [], api="websocket"))
