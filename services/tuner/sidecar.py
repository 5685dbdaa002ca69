"""The tuner sidecar: one per worker, drives its runtime config from the tuning table.

Every `interval_s`: read the worker's load report (Admin.GetLoad), the pod's share and the
table (re-read from the store only when its version moved), decide (policy.decide), and apply
a new config with Admin.SetConfig. The worker takes it at its next batch boundary: the prefill
batcher reads max_batch_size when it forms the next micro-batch, the decode scheduler when it
forms the next step, an experts server (its expert micro-batch) when the next call starts;
running sequences keep their slots when max_concurrency goes down (only admissions wait), so a
swap drops, fails or stalls nothing. Online observations are written
back with TuningTable.update (a store transaction, so concurrent sidecars all land).

Runs as `elastune serve tuner --worker HOST:PORT` (a container beside the worker in
Kubernetes, a process under `elastune up --tune`) or as an asyncio task (tests).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping

import grpc
import structlog

from ..common import keys
from ..common.load_report import LoadReport
from ..common.store import connect
from ..common.tasks import raise_if_cancelling, spawn, stop_task
from ..proto import inference_pb2 as pb
from ..proto import inference_pb2_grpc as pb_grpc
from .capacity import resolve_device
from .config import TunerConfig
from .metrics import TunerMetrics
from .policy import Decision, TunerState, decide
from .shares import MIG_ENV, MPS_ENV, detect_share
from .table import ProfilePoint, TuningTable

log = structlog.get_logger(__name__)


class TunerSidecar:
    def __init__(self, config: TunerConfig, env: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.time):
        config.validate()
        self.config = config
        self.env = dict(os.environ if env is None else env)
        self.clock = clock
        self.state = TunerState()
        self.metrics = TunerMetrics()
        self.table = TuningTable()
        self.last: Decision | None = None
        self.history: list[tuple[float, float, dict[str, int], str]] = []  # (time, share, config, reason)
        self._pending: list[ProfilePoint] = []
        self._store = connect(config.store_url) if config.store_url else None
        self._channel = grpc.aio.insecure_channel(config.worker)
        self._admin = pb_grpc.AdminStub(self._channel)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.metrics.http.serve(self.metrics.registry, self.config.metrics_host, self.config.metrics_port)
        self._task = spawn(self._run(), name="tuner.loop")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
        self.metrics.http.close()
        await self._channel.close()
        if self._store is not None:
            await self._store.aclose()

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except grpc.aio.AioRpcError as exc:  # worker restarting or gone: try again next tick
                log.warning("tuner.worker_unreachable", worker=self.config.worker, code=exc.code().name)
            except Exception as exc:  # the store down, a bad table: keep the worker's config
                raise_if_cancelling(exc)
                log.warning("tuner.tick_failed", error=repr(exc))
            await asyncio.sleep(self.config.interval_s)

    def share(self, report: LoadReport) -> float:
        if self.config.share > 0:
            return self.config.share
        hardware = {k: v for k, v in self.env.items() if k in (MPS_ENV, MIG_ENV)}
        return detect_share(hardware, reported=report.gpu_share)

    def device(self, report: LoadReport) -> str:
        return self.config.device_kind or resolve_device(self.table, report.model, report.stage, report.device)

    async def _refresh_table(self) -> None:
        if self._store is None:
            return
        version = await self._store.hget(keys.tuning_table(self.config.store_prefix), "version")
        if version is not None and int(version) != self.table.version:
            self.table = await TuningTable.load(self._store, self.config.store_prefix)

    async def tick(self) -> Decision:
        report = LoadReport.from_bytes((await self._admin.GetLoad(pb.Empty(), timeout=5)).SerializeToString())
        await self._refresh_table()
        share = self.share(report)
        self.metrics.share.labels(report.stage).set(share)
        now = self.clock()
        decision = decide(report, self.table, self.config, self.state, share, self.device(report), now)
        self.last = decision
        if decision.observation is not None:
            self._pending.append(decision.observation)
        if decision.apply is not None:
            await self._apply(report.stage, decision, share, now)
        await self._flush(report.stage)
        return decision

    async def _apply(self, stage: str, decision: Decision, share: float, now: float) -> None:
        try:
            await self._admin.SetConfig(pb.RuntimeConfig(**decision.apply), timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                self.metrics.apply_failures.labels(stage).inc()
                raise
            self.state.rejected.add(tuple(sorted(decision.apply.items())))
            self.metrics.rejected.labels(stage).inc()
            log.warning("tuner.config_rejected", config=decision.apply, error=exc.details())
            return
        explore_s = self.config.explore_s if decision.reason == "explore" else 0.0
        self.state.applied(decision.apply, now, explore_s)
        self.history.append((now, share, dict(decision.apply), decision.reason))
        self.metrics.applied(stage, decision.reason, decision.apply)
        log.info("tuner.config_applied", stage=stage, share=share, reason=decision.reason, **decision.apply)

    async def _flush(self, stage: str) -> None:
        if not self._pending or self._store is None:
            return
        points, self._pending = self._pending, []
        self.table = await TuningTable.update(self._store, self.config.store_prefix, points)
        self.metrics.table_updates.labels(stage, "online").inc(len(points))


async def main(config: TunerConfig) -> None:
    """Run until SIGTERM/SIGINT."""
    import signal

    sidecar = TunerSidecar(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await sidecar.start()
    log.info("tuner.started", worker=config.worker)
    try:
        await stop.wait()
    finally:
        await sidecar.stop()
