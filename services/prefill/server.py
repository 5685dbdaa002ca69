"""Prefill worker: queues prompts, runs them in micro-batches, streams first token + KV."""

from __future__ import annotations

import asyncio
import random

import grpc
import structlog

from ..common.convert import BadRequest, check_prompt, sampling_from_proto
from ..common.kv_transport import layout_of, send_chunks
from ..common.runtime_config import RuntimeConfig
from ..common.tasks import spawn
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
        pb_grpc.add_PrefillServicer_to_server(PrefillServicer(self), server)
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
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
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
        try:
            w.batcher.submit(job)
        except QueueFull as exc:
            w.metrics.requests.labels("overloaded").inc()
            context.set_trailing_metadata((("retry-after-ms", "200"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry in 200 ms or on another worker")
        w.active += 1
        w.metrics.requests.labels("admitted").inc()
        w.metrics.prompt_tokens.inc(len(prompt))
        try:
            out = await job.future
            w.metrics.queue_wait.observe(job.queue_ms / 1000)
            w.metrics.compute.observe(job.compute_ms / 1000)
            transport, chunks = send_chunks(out.kv, request.kv_target if request.HasField("kv_target") else None)
            yield pb.PrefillChunk(
                head=pb.PrefillHead(
                    first_token_id=out.first_token,
                    layout=layout_of(out.kv).to_proto(),
                    transport=transport,
                    queue_ms=job.queue_ms,
                    compute_ms=job.compute_ms,
                )
            )
            for chunk in chunks:
                yield pb.PrefillChunk(kv=chunk)
        finally:
            w.active -= 1
            if not job.future.done():
                job.future.cancel()


async def main(config: PrefillConfig) -> None:
    from ..common.server import run_until_signal

    await run_until_signal(PrefillWorker(config), config.drain_grace_s)
