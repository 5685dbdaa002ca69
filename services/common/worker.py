"""What prefill and decode workers share: model loading, registration, load reports, admin RPC."""

from __future__ import annotations

import asyncio
import time

import grpc
import structlog

from ..engine.runner import ModelRunner
from ..engine.tiny import ensure_tiny_model
from ..proto import inference_pb2 as pb
from ..proto import inference_pb2_grpc as pb_grpc
from .config import WorkerConfig
from .kv_transport import host_id
from .load_report import LoadReport
from .registry import WorkerRegistration
from .runtime_config import RuntimeConfig
from .server import GrpcService
from .store import connect
from .tasks import raise_if_cancelling

log = structlog.get_logger(__name__)


class Worker(GrpcService):
    stage = "worker"

    def __init__(self, config: WorkerConfig, runtime: RuntimeConfig):
        super().__init__(config.host, config.port)
        self.config = config
        self.runtime = runtime
        self.draining = False
        self.runner: ModelRunner | None = None
        self.model_name = ""
        self._store = None
        self._registration: WorkerRegistration | None = None
        self.remote_experts = None  # experts=remote: services.experts.client.RemoteExperts
        self.metrics = None  # the stage's metrics (services/<stage>/metrics.py), set by the subclass

    @property
    def address(self) -> str:
        return self.config.advertised(self.port)

    async def start(self) -> None:
        model_dir = self.config.model_dir or str(await asyncio.to_thread(ensure_tiny_model))
        self.model_name = model_dir.rstrip("/").rsplit("/", 1)[-1]
        self.runner = await asyncio.to_thread(
            ModelRunner, model_dir, self.config.dtype, self.config.device, self.config.threads
        )
        await super().start()

    async def on_start(self) -> None:
        if self.config.experts == "remote":  # before registering: no request may arrive without experts
            from ..experts.client import attach_remote_experts

            self.remote_experts = await attach_remote_experts(
                self.runner.model, self.config.store_url, self.config.store_prefix
            )
        if self.metrics is not None:
            self.metrics.http.serve(self.metrics.registry, self.config.host, self.config.metrics_port)
        if self.config.store_url:
            self._store = connect(self.config.store_url)
            self._registration = WorkerRegistration(
                self._store,
                self.config.store_prefix,
                self.load_report,
                self.config.report_interval_s,
                self.config.heartbeat_ttl_s,
            )
            await self._registration.start()

    def base_report(self, **stage_fields) -> LoadReport:
        return LoadReport(
            worker_id=self.config.worker_id,
            stage=self.stage,
            address=self.address,
            host_id=host_id(),
            model=self.model_name,
            timestamp_unix=time.time(),
            gpu_share=self.config.gpu_share,
            device=self.config.device,
            config=self.runtime,
            draining=self.draining,
            **stage_fields,
        )

    def load_report(self) -> LoadReport:
        raise NotImplementedError

    def apply_config(self, runtime: RuntimeConfig) -> None:
        """Take new runtime settings; they apply from the next batch boundary."""
        runtime.validate()
        self.runtime = runtime
        log.info(f"{self.stage}.config_applied", **runtime.__dict__)

    async def begin_drain(self) -> None:
        """Take no new work and tell routers so at once."""
        self.draining = True
        if self._registration is not None:
            try:
                await self._registration.publish()
            except Exception as exc:  # store down: the TTL removes us anyway
                raise_if_cancelling(exc)
                log.warning(f"{self.stage}.drain_publish_failed", error=str(exc))

    async def on_stop(self) -> None:
        if self.metrics is not None:
            self.metrics.http.close()
        if self._registration is not None:
            await self._registration.stop()
        if self.remote_experts is not None:
            await self.remote_experts.stop()
        if self._store is not None:
            await self._store.aclose()

    def add_admin(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_AdminServicer_to_server(AdminServicer(self), server)


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, worker: Worker):
        self.worker = worker

    async def GetConfig(self, request, context):
        return self.worker.runtime.to_proto()

    async def SetConfig(self, request, context):
        try:
            self.worker.apply_config(self.worker.runtime.updated(request))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return self.worker.runtime.to_proto()

    async def GetLoad(self, request, context):
        return pb.LoadReport.FromString(self.worker.load_report().to_bytes())

    async def Drain(self, request, context):
        grace = request.grace_s or self.worker.config.drain_grace_s
        await self.worker.begin_drain()
        try:
            await asyncio.wait_for(self.worker.drain(grace), timeout=grace)
        except asyncio.TimeoutError:
            pass
        return pb.DrainResponse(remaining=self.worker.load_report().running_seqs)
