"""Experts server: the expert FFNs of one expert group, one Forward call per layer per step.

It registers as stage `experts/<group>` (one Deployment and ScaledObject per group), so its
load report is its group's scaling signal: tokens routed in per second (`prompt_tokens_per_s`),
tokens in calls right now (`queued_tokens`), calls in flight (`queue_len`). Expert FFNs run on
one model thread (one device); the event loop only parses, queues and answers. Tokens computed
per expert are added to `keys.expert_tokens` in the store every report interval (the skew).

Runtime config (Admin Get/SetConfig, the tuner sidecar's knob): `max_batch_size` is the expert
micro-batch, the most routed tokens one expert pass computes (micro_batch.py). A call reads it
once when it starts, so a change applies from the next call and never alters one in flight.
The model thread queues pieces, not calls: a long call's pieces interleave with other calls'.
The load report's step latency (step_ms_p50/p95) is per piece: how long the device is held.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog
import torch

from ..common import keys
from ..common.runtime_config import RuntimeConfig
from ..common.stats import LatencyWindow, RateWindow
from ..common.tasks import raise_if_cancelling, spawn, stop_task
from ..common.worker import Worker
from ..engine.loader import resolve_dtype
from ..engine.tiny_moe import ensure_tiny_moe_model
from ..proto import experts_pb2 as pb
from ..proto import experts_pb2_grpc as pb_grpc
from .config import ExpertsConfig
from .metrics import ExpertsMetrics
from .micro_batch import assemble, compute, split
from .placement import Placement, stage_of
from .placement_store import ensure_placement
from .weights import CheckpointExperts, SyntheticExperts
from .wire import BadCall, ExpertCall, parse, to_bytes

log = structlog.get_logger(__name__)


class ExpertsWorker(Worker):
    name = "experts"

    def __init__(self, config: ExpertsConfig):
        micro_batch = config.micro_batch_tokens or config.max_tokens_per_call
        super().__init__(config, RuntimeConfig(max_batch_size=micro_batch, max_concurrency=1))
        self.stage = stage_of(config.expert_group)
        self.experts: CheckpointExperts | SyntheticExperts | None = None
        self.placement: Placement | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experts-model")
        self.tokens_in = RateWindow()
        self.step_ms = LatencyWindow()  # one piece (micro-batch) each: the step latency
        self.in_flight_calls = 0
        self.in_flight_tokens = 0
        self._unpublished: Counter[int] = Counter()
        self._publisher: asyncio.Task | None = None
        self.metrics = ExpertsMetrics()

    async def start(self) -> None:
        """Load the weight source instead of a whole model, then the common service start."""
        cfg: ExpertsConfig = self.config
        device = torch.device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if cfg.synthetic_experts:
            self.experts = SyntheticExperts(cfg.synthetic_experts, cfg.synthetic_hidden_size,
                                            cfg.synthetic_intermediate_size, dtype, device)
            self.model_name = "synthetic"
        else:
            model_dir = cfg.model_dir or str(await asyncio.to_thread(ensure_tiny_moe_model))
            self.experts = await asyncio.to_thread(CheckpointExperts, model_dir, dtype, device)
            self.model_name = model_dir.rstrip("/").rsplit("/", 1)[-1]
        await super(Worker, self).start()

    def add_servicers(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_ExpertsServicer_to_server(ExpertsServicer(self), server)
        self.add_admin(server)

    async def on_start(self) -> None:
        cfg: ExpertsConfig = self.config
        if cfg.store_url:
            from ..common.store import connect

            store = connect(cfg.store_url)
            try:
                self.placement = await ensure_placement(
                    store, cfg.store_prefix, Placement.even(self.experts.num_experts, cfg.num_groups)
                )
            finally:
                await store.aclose()
            mine = list(self.placement.groups.get(cfg.expert_group, ()))
            await asyncio.get_running_loop().run_in_executor(self._executor, self.experts.load, mine)
            log.info("experts.loaded", group=cfg.expert_group, experts=mine, placement_version=self.placement.version)
            self.metrics.placement_version.set(self.placement.version)
        await super().on_start()  # registers: the group's callers see this server only once it is loaded
        if self._store is not None:
            self._publisher = spawn(self._publish_tokens(), name="experts.publish_tokens")

    def load_report(self):
        return self.base_report(
            queue_len=self.in_flight_calls,
            queued_tokens=self.in_flight_tokens,
            prompt_tokens_per_s=self.tokens_in.rate(),
            step_ms_p50=self.step_ms.percentile(50),
            step_ms_p95=self.step_ms.percentile(95),
        )

    async def forward(self, call: ExpertCall) -> tuple[torch.Tensor, float]:
        pairs = int(call.expert_ids.numel())
        micro_batch = self.runtime.max_batch_size  # as of now, for the whole call
        self.in_flight_calls += 1
        self.in_flight_tokens += pairs
        group, m = self.config.expert_group, self.metrics
        m.in_flight.labels(group).inc()
        try:
            loop = asyncio.get_running_loop()
            # Cutting sorts the pairs: off the event loop when there is something to cut.
            pieces = (split(call, micro_batch) if pairs <= micro_batch
                      else await loop.run_in_executor(self._executor, split, call, micro_batch))
            outputs, total_ms = [], 0.0
            for piece in pieces:
                y, ms = await loop.run_in_executor(self._executor, self._compute, piece.call)
                outputs.append(y)
                total_ms += ms
            m.micro_batches.labels(group).inc(len(pieces))
            m.forward.labels(group).observe(total_ms / 1000)
            return assemble(call, pieces, outputs), total_ms
        finally:
            self.in_flight_calls -= 1
            self.in_flight_tokens -= pairs
            self.tokens_in.add(pairs)
            routed = Counter(call.expert_ids.tolist())
            self._unpublished.update(routed)
            m.in_flight.labels(group).dec()
            m.requests.labels(group).inc()
            m.batch_tokens.labels(group).observe(pairs)
            m.routed(group, routed)

    def _compute(self, call: ExpertCall) -> tuple[torch.Tensor, float]:
        """One piece on the model thread; returns its output and its milliseconds."""
        start = time.perf_counter()
        out = compute(call, self.experts.get, self.experts.dtype, self.experts.device)
        hold = self.config.service_us_per_token * call.expert_ids.numel() / 1e6 - (time.perf_counter() - start)
        if hold > 0:
            time.sleep(hold)  # emulated device time (benchmarks); this thread is the device, so calls queue
        ms = (time.perf_counter() - start) * 1000
        self.step_ms.add(ms)
        return out, ms

    async def _publish_tokens(self) -> None:
        key = keys.expert_tokens(self.config.store_prefix)
        while True:
            await asyncio.sleep(self.config.report_interval_s)
            counts, self._unpublished = self._unpublished, Counter()
            if not counts:
                continue
            try:
                async with self._store.pipeline(transaction=False) as pipe:
                    for e, n in counts.items():
                        pipe.hincrby(key, str(e), n)
                    await pipe.execute()
            except Exception as exc:  # store down: keep the counts for the next try
                raise_if_cancelling(exc)
                self._unpublished.update(counts)
                log.warning("experts.publish_failed", error=str(exc))

    async def drain(self, grace_s: float) -> None:
        """Calls in flight finish; callers stop choosing this server once it reports draining."""
        await self.begin_drain()
        # Callers refresh their view of the replicas about twice a second: until they have seen
        # the draining report, keep answering rather than make them retry elsewhere.
        await asyncio.sleep(min(grace_s / 2, 1.0))
        while self.in_flight_calls:
            await asyncio.sleep(0.02)

    async def on_stop(self) -> None:
        if self._publisher is not None:
            await stop_task(self._publisher)
        self._executor.shutdown(wait=False, cancel_futures=True)
        await super().on_stop()


class ExpertsServicer(pb_grpc.ExpertsServicer):
    def __init__(self, worker: ExpertsWorker):
        self.worker = worker

    async def Forward(self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext) -> pb.ForwardResponse:
        w = self.worker
        e = w.experts
        try:
            call = parse(request, e.num_layers, e.num_experts, e.hidden_size, w.config.max_tokens_per_call)
        except BadCall as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        out, ms = await w.forward(call)
        return pb.ForwardResponse(hidden=to_bytes(out), compute_ms=ms)


async def main(config: ExpertsConfig) -> None:
    from ..common.server import run_until_signal

    await run_until_signal(ExpertsWorker(config), config.drain_grace_s)
