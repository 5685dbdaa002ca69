"""The gateway process: OpenAI HTTP API and gRPC Generate over one pipeline client."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import structlog
from aiohttp import web

from ..common.registry import WorkerDirectory
from ..common.server import GrpcService
from ..common.store import connect
from ..engine.model_config import ModelConfig
from ..engine.tiny import ensure_tiny_model
from ..proto import inference_pb2_grpc as pb_grpc
from .config import GatewayConfig
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
            WorkerDirectory(self._store, self.config.store_prefix),
            self.config.refresh_s,
            self.config.retries,
            self.config.overload_retry_after_s,
        )
        await self.pipeline.start()
        await super().start()

    def add_servicers(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_GatewayServicer_to_server(GatewayServicer(self), server)

    async def on_start(self) -> None:
        app = web.Application(client_max_size=8 << 20)
        OpenAIApi(self).add_routes(app)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.http_port)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]
        log.info("gateway.http_started", url=f"http://{self.config.host}:{self.http_port}/v1")

    async def on_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.pipeline.stop()
        if self._store is not None:
            await self._store.aclose()


async def main(config: GatewayConfig) -> None:
    from ..common.server import run_until_signal

    await run_until_signal(Gateway(config), grace_s=5.0)
