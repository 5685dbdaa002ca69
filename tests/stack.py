"""An in-process pipeline for tests: real gRPC servers on 127.0.0.1:0, real store, real model."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import openai

from services.decode.config import DecodeConfig
from services.decode.server import DecodeWorker
from services.gateway.config import GatewayConfig
from services.gateway.server import Gateway
from services.prefill.config import PrefillConfig
from services.prefill.server import PrefillWorker


@dataclass
class LocalStack:
    gateway: Gateway
    prefill: list[PrefillWorker] = field(default_factory=list)
    decode: list[DecodeWorker] = field(default_factory=list)
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    def openai(self, timeout: float = 60, api_key: str = "unused") -> openai.AsyncOpenAI:
        """An OpenAI client for this stack's gateway, closed by stop().

        Never leave one to the garbage collector in a test: a collected AsyncOpenAI schedules its
        own close, and closing its connections then unregisters their old file descriptor numbers
        from the event loop's selector, by then perhaps reused by a socket the gateway accepted
        in this same loop, whose request is then never read (a hang until the client's timeout)."""
        client = openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key=api_key, max_retries=0, timeout=timeout)
        self.clients.append(client)
        return client

    async def stop(self) -> None:
        for client in self.clients:
            await client.close()
        await self.gateway.stop(1.0)
        for w in self.prefill + self.decode:
            await w.stop(1.0)


async def start_stack(
    store_url: str, model_dir, prefill: int = 1, decode: int = 1, decode_overrides: dict | None = None,
    prefill_overrides: dict | None = None, gateway_overrides: dict | None = None,
) -> LocalStack:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    common = dict(model_dir=str(model_dir), store_url=store_url, store_prefix=prefix, report_interval_s=0.2, heartbeat_ttl_s=1.0)
    prefills = [PrefillWorker(PrefillConfig(**common, **(prefill_overrides or {}))) for _ in range(prefill)]
    decodes = [DecodeWorker(DecodeConfig(**common, kv_slots=32, max_concurrency=32, **(decode_overrides or {}))) for _ in range(decode)]
    for w in prefills + decodes:
        await w.start()
    gateway = Gateway(GatewayConfig(
        model_dir=str(model_dir), store_url=store_url, store_prefix=prefix, http_port=0, refresh_s=0.1,
        **(gateway_overrides or {}),
    ))
    await gateway.start()
    return LocalStack(gateway, prefills, decodes)
