"""Prefill worker: queues prompts, runs them in micro-batches, streams the KV layer by layer
while later layers compute, and the first token as soon as the logits exist."""

from __future__ import annotations

import asyncio
import random

import grpc
import structlog

from ..common.convert import BadRequest, check_prompt, sampling_from_proto
from ..common.kv_transport import KvSender, prompt_layout
from ..common.kv_wire import add_prefill_servicer
from ..common.runtime_config import RuntimeConfig
from ..common.tasks import spawn, stop_task
from ..common.worker import Worker
from ..proto import inference_pb2 as pb
from ..proto import inference_pb2_grpc as pb_grpc
from .batcher import PrefillBatcher, PrefillJob, QueueFull
from .config import PrefillConfig
from .metrics import PrefillMetrics

log = structlog.get_logger(__name__)


class PrefillWorker(Worker):
    name = stage = "prefill"

    def __init__(self, config: PrefillConfig):
        super().__init__(config, RuntimeConfig(max_batch_size=config.max_batch_size, max_concurrency=config.max_queue))
        self.batcher: PrefillBatcher | None = None
        self._loop_task: asyncio.Task | None = None
        self.active = 0  # requests accepted and not yet fully streamed
        self.metrics = PrefillMetrics(self)

    def add_servicers(self, server: grpc.aio.Server) -> None:
        add_prefill_servicer(PrefillServicer(self), server)  # KV bytes go out without protobuf copies
        self.add_admin(server)

    async def on_start(self) -> None:
        cfg: PrefillConfig = self.config
        self.batcher = PrefillBatcher(self.runner, self.runtime.max_batch_size, cfg.max_batch_tokens, cfg.max_queue)
        self._loop_task = spawn(self.batcher.run(), name="prefill.batcher")
        await super().on_start()

    def apply_config(self, runtime: RuntimeConfig) -> None:
        super().apply_config(runtime)
        self.batcher.max_batch_size = runtime.max_batch_size  # read at the next batch boundary

    def load_report(self):
        b = self.batcher
        return self.base_report(
            queue_len=b.queue_len if b else 0,
            queued_tokens=b.queued_tokens if b else 0,
            running_seqs=self.active,
            prompt_tokens_per_s=b.tokens_in.rate() if b else 0.0,
            step_ms_p50=b.batch_ms.percentile(50) if b else 0.0,
            step_ms_p95=b.batch_ms.percentile(95) if b else 0.0,
        )

    async def drain(self, grace_s: float) -> None:
        """Finish every accepted prompt (queued ones included), then stop."""
        await self.begin_drain()
        while self.active:
            await asyncio.sleep(0.05)

    async def on_stop(self) -> None:
        if self._loop_task is not None:
            await stop_task(self._loop_task)
        if self.batcher is not None:
            self.batcher.close()
        await super().on_stop()


class PrefillServicer(pb_grpc.PrefillServicer):
    def __init__(self, worker: PrefillWorker):
        self.worker = worker

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext):
        w = self.worker
        if w.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill worker is draining; retry on another worker")
        try:
            params = sampling_from_proto(request.sampling)
            prompt = list(request.prompt_token_ids)
            check_prompt(prompt, w.runner.config.vocab_size, w.runner.config.max_model_len)
        except BadRequest as exc:
            w.metrics.requests.labels("invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        job = PrefillJob(
            request.request_id, prompt, params, seed, asyncio.get_running_loop().create_future(),
            offset=request.sampling_offset,
        )
        cfg = w.runner.config
        layout = prompt_layout(w.runner.dtype, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, len(prompt))
        target = request.kv_target if request.HasField("kv_target") else None
        try:
            sender = KvSender(layout, target, w.runner.device, asyncio.get_running_loop())
        except (OSError, ValueError) as exc:  # the decode worker's buffer is gone or too small
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"kv_target: {exc}")
        job.on_kv = sender.put
        job.future.add_done_callback(lambda _: sender.end())
        try:
            w.batcher.submit(job)
        except QueueFull as exc:
            w.metrics.requests.labels("overloaded").inc()
            context.set_trailing_metadata((("retry-after-ms", "200"),))
            sender.close()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry in 200 ms or on another worker")
        w.active += 1
        w.metrics.requests.labels("admitted").inc()
        w.metrics.prompt_tokens.inc(len(prompt))
        try:
            async for msg in self._stream(job, sender):
                yield msg
        except Exception as exc:  # the model or the KV copy failed: a status, never a silent end
            log.warning("prefill.failed", request_id=request.request_id, error=repr(exc)[:200])
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"prefill failed after {sender.sent_layers} of {sender.layout.num_layers} KV layers: {exc!r}"[:500],
            )
        finally:
            w.active -= 1
            if not job.future.done():
                job.future.cancel()
            sender.close()

    async def _stream(self, job: PrefillJob, sender: KvSender):
        """Head at the first layer, KV chunks as layers come out of the model, and the first
        token as soon as it exists: ahead of KV chunks still waiting to be sent."""
        w = self.worker
        first_sent = False
        chunk = await sender.next_chunk()
        if chunk is not None:
            yield pb.PrefillChunk(head=pb.PrefillHead(
                layout=sender.layout.to_proto(), transport=sender.transport, queue_ms=job.queue_ms,
            ))
        while chunk is not None:
            if not first_sent and _succeeded(job.future):
                first_sent = True
                yield self._first(job)
            yield chunk  # encoded as PrefillChunk{kv} by kv_wire
            chunk = await sender.next_chunk()
        job.future.result()  # raises the model's error, if any
        w.metrics.queue_wait.observe(job.queue_ms / 1000)
        w.metrics.compute.observe(job.compute_ms / 1000)
        if not first_sent:
            yield self._first(job)

    @staticmethod
    def _first(job: PrefillJob) -> pb.PrefillChunk:
        return pb.PrefillChunk(first=pb.PrefillFirst(token_id=job.future.result().first_token, compute_ms=job.compute_ms))


def _succeeded(fut: asyncio.Future) -> bool:
    return fut.done() and not fut.cancelled() and fut.exception() is None


async def main(config: PrefillConfig) -> None:
    from ..common.server import run_until_signal

    await run_until_signal(PrefillWorker(config), config.drain_grace_s)
