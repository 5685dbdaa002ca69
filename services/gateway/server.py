"""The gateway process: OpenAI HTTP API and gRPC Generate over one pipeline client."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import grpc
import structlog
from aiohttp import web

from ..common.kv_transport import host_id
from ..common.load_report import LoadReport
from ..common.registry import WorkerDirectory, WorkerRegistration
from ..common.server import GrpcService
from ..common.store import connect
from ..engine.model_config import ModelConfig
from ..engine.tiny import ensure_tiny_model
from ..proto import inference_pb2_grpc as pb_grpc
from .auth import Authenticator, load_keys
from .config import GatewayConfig
from .gate import Gate
from .grpc_api import GatewayServicer
from .http_api import OpenAIApi
from .metrics import GatewayMetrics
from .openai_protocol import Limits
from .pipeline import Pipeline
from .tokenizer import PromptTokenizer

log = structlog.get_logger(__name__)


class Gateway(GrpcService):
    name = "gateway"

    def __init__(self, config: GatewayConfig):
        super().__init__(config.host, config.grpc_port)
        if not config.store_url:
            raise ValueError("the gateway needs a store: set store_url (REDIS_URL)")
        self.config = config
        self.created = int(time.time())
        self.metrics = GatewayMetrics()
        self.http_port = 0
        self._runner: web.AppRunner | None = None
        self._store = None
        self._registration: WorkerRegistration | None = None
        self.gateway_id = f"gateway-{uuid.uuid4().hex[:8]}"
        self.auth = Authenticator(load_keys(config.api_keys, config.api_keys_file))

    @staticmethod
    def now() -> int:
        return int(time.time())

    async def start(self) -> None:
        model_dir = Path(self.config.model_dir or ensure_tiny_model())
        self.model_name = self.config.model_name or model_dir.name
        model = ModelConfig.from_dir(model_dir)
        self.tokenizer = PromptTokenizer(model_dir)
        self.limits = Limits(
            model_name=self.model_name,
            max_model_len=model.max_model_len,
            max_tokens_limit=min(self.config.max_tokens_limit, model.max_model_len),
        )
        self._store = connect(self.config.store_url)
        self.pipeline = Pipeline(
            # hold_s: a store that restarted empty does not empty the routing view (see WorkerDirectory)
            WorkerDirectory(self._store, self.config.store_prefix, hold_s=self.config.heartbeat_ttl_s),
            self.config.refresh_s,
            self.config.retries,
            self.config.overload_retry_after_s,
            self.config.cold_start_wait_s,
        )
        self.pipeline.on_itl = self.metrics.itl.observe
        self.gate = Gate(self.config, self.pipeline, self.metrics, store=self._store)
        await self.pipeline.start()
        await super().start()
        self._registration = WorkerRegistration(
            self._store, self.config.store_prefix, self.load_report, self.config.report_interval_s,
            self.config.heartbeat_ttl_s,
        )
        await self._registration.start()

    def load_report(self) -> LoadReport:
        """The gateway's view for the scaler: work waiting for a first token (needs prefill and
        decode capacity, even when a stage has no worker yet) and work streaming from decode."""
        p = self.pipeline
        return LoadReport(
            worker_id=self.gateway_id,
            stage="gateway",
            address=f"{self.config.host}:{self.port}",
            host_id=host_id(),
            model=self.model_name,
            timestamp_unix=time.time(),
            queue_len=p.queued,
            queued_tokens=p.queued_tokens,
            running_seqs=p.decoding,
            prompt_tokens_per_s=p.prompt_tokens_in.rate(),
            output_tokens_per_s=p.tokens_out.rate(),
            ttft_ms_p95=p.ttft_ms.percentile(95),
            itl_ms_p95=p.itl_ms.percentile(95),
        )

    def add_servicers(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_GatewayServicer_to_server(GatewayServicer(self), server)

    async def on_start(self) -> None:
        api = OpenAIApi(self)
        app = web.Application(client_max_size=8 << 20, middlewares=[api.guard])
        api.add_routes(app)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.http_port)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]
        log.info("gateway.http_started", url=f"http://{self.config.host}:{self.http_port}/v1",
                 auth="on" if self.auth.enabled else "off")

    async def on_stop(self) -> None:
        if self._registration is not None:
            await self._registration.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.pipeline.stop()
        if self._store is not None:
            await self._store.aclose()


async def main(config: GatewayConfig) -> None:
    from ..common.server import run_until_signal

    await run_until_signal(Gateway(config), grace_s=5.0)
