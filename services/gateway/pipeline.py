"""The gateway's side of the pipeline: pick workers, stream tokens from decode, retry safely.

A request is retried on another decode worker only before its first token, so a client
never sees a token twice. After that, a failure ends the stream with a clear status.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import grpc
import structlog

from ..common.convert import sampling_to_proto
from ..common.load_report import LoadReport
from ..common.registry import WorkerDirectory
from ..common.request_context import outgoing_metadata
from ..common.server import GRPC_OPTIONS
from ..common.stats import LatencyWindow, RateWindow
from ..common.tasks import raise_if_cancelling, spawn, stop_task
from ..common.types import GenerationRequest
from ..proto import inference_pb2 as pb
from ..proto import inference_pb2_grpc as pb_grpc
from .router import pick

log = structlog.get_logger(__name__)

SUSPECT_S = 5.0  # a worker that refused a connection is avoided this long (or until it reports again)


class PipelineError(Exception):
    """Raised before the first token; the HTTP/gRPC layer maps `kind` to a status."""

    def __init__(self, kind: str, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.kind = kind  # "unavailable", "overloaded", "invalid", "timeout", "failed"
        self.retry_after_s = retry_after_s


@dataclass
class TokenEvent:
    token_ids: list[int]
    finish_reason: str | None
    timings: pb.StageTimings | None = None


class Pipeline:
    def __init__(
        self, directory: WorkerDirectory, refresh_s: float, retries: int, retry_after_s: float,
        cold_start_wait_s: float = 0.0,
    ):
        self.directory = directory
        self.cold_start_wait_s = cold_start_wait_s
        self.refresh_s = refresh_s
        self.retries = retries
        self.retry_after_s = retry_after_s
        self.workers: dict[str, list[LoadReport]] = {"prefill": [], "decode": []}
        self.open_requests: Counter[str] = Counter()
        # per-stage accounting: requests (and their prompt tokens) waiting for a first
        # token (in prefill or decode admission), and requests streaming from decode
        self.queued = 0
        self.queued_tokens = 0
        self.decoding = 0
        self.handovers = 0  # streams continued on the worker a draining one migrated them to
        self.resumed = 0  # streams re-prefilled elsewhere after their decode worker was lost
        self.prompt_tokens_in = RateWindow()  # arrivals, for the scaler's token-rate signal
        self.tokens_out = RateWindow()
        self.ttft_ms = LatencyWindow()  # for the scaler's SLO signal
        self.itl_ms = LatencyWindow()
        self.on_itl: Callable[[float], None] = lambda seconds: None  # per-token gap, for the ITL histogram
        self._suspect: dict[str, float] = {}
        # when the directory last went from some decode workers to none: requests arriving within one
        # heartbeat TTL of that wait for the stage to come back before failing (see _wait_for_decode)
        self._decode_lost_at = float("-inf")
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = spawn(self._refresh_loop(), name="gateway.directory")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
        for ch in self._channels.values():
            await ch.close()

    async def refresh(self) -> None:
        had_decode = bool(self.workers["decode"])
        for stage in self.workers:
            self.workers[stage] = await self.directory.workers(stage)
        now = time.monotonic()
        if had_decode and not self.workers["decode"]:
            self._decode_lost_at = now
        self._suspect = {w: t for w, t in self._suspect.items() if now - t < SUSPECT_S}

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception as exc:  # store unreachable: route on the last view
                raise_if_cancelling(exc)
                log.warning("gateway.refresh_failed", error=str(exc)[:200])

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        return self._channels[address]

    def mark_suspect(self, worker_id: str) -> None:
        """Route around a worker for SUSPECT_S: it refused a call or dropped a stream."""
        self._suspect[worker_id] = time.monotonic()

    def _pick(self, stage: str, exclude: set[str]) -> LoadReport | None:
        """A worker not in `exclude`, preferring ones that are not suspect. A suspect one (say, it
        just recovered from a freeze) is still better than none: the request would fail."""
        workers = self.workers[stage]
        trusted = pick(workers, self.open_requests, exclude | self._suspect.keys())
        return trusted or pick(workers, self.open_requests, exclude)

    async def stream(self, req: GenerationRequest, timeout_s: float) -> AsyncIterator[TokenEvent]:
        prompt_tokens = len(req.prompt_token_ids)
        self.prompt_tokens_in.add(prompt_tokens)
        self.queued += 1
        self.queued_tokens += prompt_tokens
        queued = True
        inner = self._stream(req, timeout_s)
        last = time.monotonic()
        try:
            async for event in inner:
                now = time.monotonic()
                if queued:
                    queued = False
                    self.queued -= 1
                    self.queued_tokens -= prompt_tokens
                    self.decoding += 1
                    self.ttft_ms.add((now - last) * 1000)
                elif event.token_ids:
                    gap = (now - last) / len(event.token_ids)
                    self.itl_ms.add(gap * 1000)
                    self.on_itl(gap)
                last = now
                self.tokens_out.add(len(event.token_ids))
                yield event
        finally:
            await inner.aclose()  # cancels the decode call now, not when the generator is collected
            if queued:
                self.queued -= 1
                self.queued_tokens -= prompt_tokens
            else:
                self.decoding -= 1

    async def _stream(self, req: GenerationRequest, timeout_s: float) -> AsyncIterator[TokenEvent]:
        """Tokens of one request, across worker changes.

        - Before the first token, a busy or unreachable decode worker is replaced by another.
        - A draining worker ends its stream with `migrated_to`: the stream goes on with
          Decode.Resume on the worker that adopted the sequence (KV included).
        - A worker that dies mid-stream is replaced by another that prefills the prompt plus
          the tokens already sent and continues from the same sampling index and seed, so
          nothing is lost or repeated and greedy output is unchanged.
        """
        deadline = time.time() + timeout_s
        if req.sampling.seed is None:  # a resumed request must draw from the same stream
            req = replace(req, sampling=replace(req.sampling, seed=random.getrandbits(63)))
        sent: list[int] = []
        tried: set[str] = set()
        failure: PipelineError | None = None
        resume: tuple[str, str] | None = None  # (address, migration id) after a hand-over
        attempts = 0
        while True:
            if resume is not None:
                address, migration_id = resume
                worker_id = next((w.worker_id for w in self.workers["decode"] if w.address == address), address)
                call = pb_grpc.DecodeStub(self._channel(address)).Resume(
                    pb.ResumeRequest(migration_id=migration_id), timeout=max(deadline - time.time(), 0.001),
                    metadata=outgoing_metadata(req.request_id))
                resume = None
            else:
                if attempts > self.retries:
                    break
                attempts += 1
                decode = self._pick("decode", tried)
                if decode is None and not tried:
                    decode = await self._wait_for_decode(deadline)
                if decode is None:
                    break
                tried.add(decode.worker_id)
                worker_id, address = decode.worker_id, decode.address
                call = self._generate_call(decode.address, req, sent, deadline)
            self.open_requests[worker_id] += 1
            try:
                async for chunk in call:
                    sent.extend(chunk.token_ids)
                    if chunk.token_ids or chunk.finish_reason:
                        yield TokenEvent(list(chunk.token_ids), chunk.finish_reason or None, chunk.timings)
                    if chunk.finish_reason:
                        return
                    if chunk.migrated_to:
                        resume = (chunk.migrated_to, chunk.migration_id)
                        self.handovers += 1
                if resume is None:
                    raise PipelineError("failed", f"decode worker {address} ended the stream without finishing")
            except grpc.aio.AioRpcError as exc:
                failure = self._classify(exc, worker_id, address)
                resumable = ("unavailable", "overloaded") if not sent else ("unavailable", "failed")
                if failure.kind not in resumable:
                    raise failure from None
                self.resumed += bool(sent)
                log.warning("gateway.decode_lost", request_id=req.request_id, worker=address, tokens_sent=len(sent),
                            error=str(failure)[:200])
            finally:
                call.cancel()
                self.open_requests[worker_id] -= 1
                if self.open_requests[worker_id] <= 0:
                    del self.open_requests[worker_id]
        if failure is not None:
            raise failure
        raise PipelineError("unavailable", "no decode worker is available; retry later", self.retry_after_s)

    async def _wait_for_decode(self, deadline: float) -> LoadReport | None:
        """No decode worker at all: hold the request while the stage scales from zero (its
        queued work is in this gateway's load report, which activates the scaler), up to
        cold_start_wait_s; then give up with 503.

        A stage that emptied less than one heartbeat TTL ago (the directory's hold_s) is held for
        the rest of that TTL even with cold_start_wait_s = 0: after a stall of this process, or
        of the store, the directory can drop workers whose next heartbeat simply has not landed
        yet, and a request arriving in that gap should not fail."""
        blip_left = self._decode_lost_at + self.directory.hold_s - time.monotonic()
        until = min(deadline, time.time() + max(self.cold_start_wait_s, blip_left))
        while time.time() < until:
            await asyncio.sleep(self.refresh_s)
            decode = self._pick("decode", set())
            if decode is not None:
                return decode
        return None

    def _generate_call(self, address: str, req: GenerationRequest, sent: list[int], deadline: float):
        """Decode.Generate for the request, continuing after `sent` tokens when resuming."""
        prefill = self._pick("prefill", set())
        sampling = sampling_to_proto(replace(req.sampling, max_tokens=req.sampling.max_tokens - len(sent)))
        return pb_grpc.DecodeStub(self._channel(address)).Generate(
            pb.DecodeRequest(
                request_id=req.request_id,
                prompt_token_ids=list(req.prompt_token_ids) + sent,
                sampling=sampling,
                prefill_address=prefill.address if prefill else "",
                prefill_host_id=prefill.host_id if prefill else "",
                deadline_unix_s=deadline,
                sampling_offset=len(sent),
            ),
            timeout=max(deadline - time.time(), 0.001),
            metadata=outgoing_metadata(req.request_id),
        )

    def _classify(self, exc: grpc.aio.AioRpcError, worker_id: str, address: str) -> PipelineError:
        code, detail = exc.code(), exc.details() or ""
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            self.mark_suspect(worker_id)
            return PipelineError("unavailable", f"decode worker {address} is unavailable: {detail}", self.retry_after_s)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return PipelineError("overloaded", f"all decode workers are busy: {detail}", self.retry_after_s)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return PipelineError("invalid", detail)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return PipelineError("timeout", "the request did not finish within its timeout")
        return PipelineError("failed", f"decode worker {address} failed: {code.name}: {detail}")
