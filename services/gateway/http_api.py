"""OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..common.request_context import bind_request_id, unbind_request_id
from ..common.types import GenerationRequest
from .auth import EXEMPT_PATHS, Unauthorized
from .gate import Rejected, Ticket, parse_timeout
from .generation import Delta, RequestStats, generate
from .openai_protocol import KIND_CHAT, ApiError, parse_chat, parse_completion, resolve_max_tokens
from .openai_responses import (
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    models_response,
    usage_chunk,
)
from .pipeline import PipelineError

if TYPE_CHECKING:
    from .server import Gateway

log = structlog.get_logger(__name__)

CALLER = web.RequestKey("caller", str)  # who sent the request (a hash of its API key), for budgets

PIPELINE_STATUS = {"unavailable": 503, "overloaded": 429, "invalid": 400, "timeout": 504, "failed": 502}


def api_error(exc: PipelineError) -> ApiError:
    param = code = None
    if isinstance(exc, Rejected):
        param, code = exc.param, exc.code
    return ApiError(PIPELINE_STATUS[exc.kind], str(exc), param=param, code=code, retry_after_s=exc.retry_after_s)


def error_response(err: ApiError) -> web.Response:
    headers = {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    return web.json_response(err.body(), status=err.status, headers=headers)


class OpenAIApi:
    def __init__(self, gateway: "Gateway"):
        self.gw = gateway

    @web.middleware
    async def guard(self, request: web.Request, handler):
        """Every answer is OpenAI-shaped: auth first (probes and scrapes exempt), then aiohttp's
        own errors (404, 405, 413) and anything unexpected become JSON error bodies."""
        if request.path not in EXEMPT_PATHS:
            try:
                request[CALLER] = self.gw.auth.identify(request.headers.get("Authorization"))
            except Unauthorized as exc:
                self.gw.metrics.rejected.labels("unauthorized").inc()
                return error_response(ApiError(401, str(exc), code="invalid_api_key"))
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(ApiError(exc.status, f"{request.method} {request.path}: {exc.reason}"))
        except Exception:
            log.exception("gateway.http_error", path=request.path)
            return error_response(ApiError(500, "internal error; see the gateway's log"))

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(models_response(self.gw.model_name, self.gw.created))

    async def health(self, request: web.Request) -> web.Response:
        workers = {stage: len(ws) for stage, ws in self.gw.pipeline.workers.items()}
        ready = workers.get("decode", 0) > 0
        return web.json_response({"status": "ok" if ready else "no_workers", "workers": workers}, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        m, p = self.gw.metrics, self.gw.pipeline
        for stage, ws in p.workers.items():
            m.workers.labels(stage).set(len(ws))
        m.stage_requests.labels("queued").set(p.queued)
        m.stage_requests.labels("decoding").set(p.decoding)
        m.queued_prompt_tokens.set(p.queued_tokens)
        m.fleet_kv_tokens.labels("used").set(sum(w.kv_used_tokens for w in p.workers["decode"]))
        m.fleet_kv_tokens.labels("capacity").set(sum(w.kv_capacity_tokens for w in p.workers["decode"]))
        return web.Response(body=generate_latest(self.gw.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completions")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def _serve(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        m = self.gw.metrics
        m.in_flight.inc()
        try:
            response = await self._handle(request, endpoint)
        finally:
            m.in_flight.dec()
            unbind_request_id()  # a kept-alive connection's next request must not inherit it
        m.requests.labels(endpoint, str(response.status)).inc()
        return response

    async def _admit(self, request: web.Request, endpoint: str):
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {str(exc)[:200]}") from None
        limits = self.gw.limits
        call = parse_chat(body, limits) if endpoint == "chat" else parse_completion(body, limits)
        timeout_s = parse_timeout(body, request.headers, self.gw.config)
        tok = self.gw.tokenizer
        if call.kind == KIND_CHAT:
            prompt_ids = tok.encode_chat(call.messages)
        elif call.prompt_token_ids is not None:
            prompt_ids = list(call.prompt_token_ids)
            bad = next((t for t in prompt_ids if t >= tok.vocab_size), None)
            if bad is not None:
                raise ApiError(400, f"prompt holds token id {bad}; ids must be < {tok.vocab_size}", param="prompt")
        else:
            prompt_ids = tok.encode_text(call.prompt)
        prompt_param = "messages" if call.kind == KIND_CHAT else "prompt"
        self.gw.gate.check_prompt(len(prompt_ids), prompt_param)
        max_tokens = resolve_max_tokens(call, len(prompt_ids), limits)
        prefix = "chatcmpl" if call.kind == KIND_CHAT else "cmpl"
        req = GenerationRequest(
            request_id=f"{prefix}-{uuid.uuid4().hex}",
            prompt_token_ids=tuple(prompt_ids),
            sampling=replace(call.sampling, max_tokens=max_tokens),
            stop=call.stop,
            timeout_s=timeout_s,
        )
        ticket = await self.gw.gate.admit(request.get(CALLER, "anonymous"), len(prompt_ids), max_tokens, timeout_s,
                                    call.max_tokens_param)
        return call, req, ticket

    async def _handle(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        stats = RequestStats()
        ticket: Ticket | None = None
        try:
            call, req, ticket = await self._admit(request, endpoint)
            bind_request_id(req.request_id)
            deltas = generate(self.gw.pipeline, self.gw.tokenizer.tokenizer, req, req.timeout_s, stats)
            first = await anext(deltas)  # errors before the first token become HTTP statuses
        except ApiError as err:
            await self._release(ticket, None, stats)
            return error_response(err)
        except PipelineError as exc:
            await self._release(ticket, None, stats)
            return error_response(api_error(exc))
        self.gw.metrics.prompt_tokens.inc(len(req.prompt_token_ids))
        if stats.ttft_s is not None:
            self.gw.metrics.ttft.observe(stats.ttft_s)
        try:
            if call.stream:
                return await self._stream(request, call, req, first, deltas, stats)
            return await self._collect(call, req, first, deltas, stats)
        finally:
            await deltas.aclose()
            await self._release(ticket, req, stats)
            self.gw.metrics.completion_tokens.inc(stats.completion_tokens)
            self.gw.metrics.e2e.observe(time.monotonic() - stats.start)

    async def _release(self, ticket: Ticket | None, req: GenerationRequest | None, stats: RequestStats) -> None:
        prompt = len(req.prompt_token_ids) if req is not None and stats.first_token_at is not None else 0
        await self.gw.gate.release(ticket, prompt + stats.completion_tokens)

    async def _collect(self, call, req, first: Delta, deltas, stats) -> web.Response:
        parts, last, ids = [first.text], first, list(first.token_ids)
        try:
            async for delta in deltas:
                parts.append(delta.text)
                ids.extend(delta.token_ids)
                last = delta
        except PipelineError as exc:
            return error_response(api_error(exc))
        build = chat_response if call.kind == KIND_CHAT else completion_response
        body = build(call, req.request_id, self.gw.now(), "".join(parts), last.finish_reason,
                     len(req.prompt_token_ids), stats.completion_tokens)
        if call.return_token_ids:
            body["choices"][0]["token_ids"] = ids
            body["prompt_token_ids"] = list(req.prompt_token_ids)
        return web.json_response(body, headers={**_timing_headers(stats), "X-Request-Id": req.request_id})

    async def _stream(self, request, call, req, first: Delta, deltas, stats) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Request-Id": req.request_id})
        await response.prepare(request)
        created = self.gw.now()
        chat = call.kind == KIND_CHAT

        async def send(obj: dict) -> None:
            await response.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")

        def event(delta: Delta, is_first: bool) -> dict:
            if chat:
                chunk = chat_chunk(call, req.request_id, created, delta.text, delta.finish_reason, is_first)
            else:
                chunk = completion_chunk(call, req.request_id, created, delta.text, delta.finish_reason)
            if call.return_token_ids:
                chunk["choices"][0]["token_ids"] = delta.token_ids
            return chunk

        try:
            await send(event(first, True))
            async for delta in deltas:
                await send(event(delta, False))
            if call.include_usage:
                usage = usage_chunk(call, req.request_id, created, len(req.prompt_token_ids), stats.completion_tokens)
                # The headers went out before any stage had run: the stage timings ride on the last event.
                usage["elastune_timings"] = _timing_headers(stats)
                await send(usage)
            await response.write(b"data: [DONE]\n\n")
        except PipelineError as exc:
            await send(api_error(exc).body())  # mid-stream failure: an error event, then the end
        except (ConnectionResetError, ConnectionError):
            log.info("gateway.client_gone", request_id=req.request_id)
            return response
        await response.write_eof()
        return response


def _timing_headers(stats: RequestStats) -> dict[str, str]:
    """Per-request stage timings (ms) as X-Elastune-* headers; a stream sends the same names and
    values in its usage event as `elastune_timings`."""
    headers = {}
    if stats.ttft_s is not None:
        headers["X-Elastune-TTFT-Ms"] = f"{stats.ttft_s * 1000:.3f}"
    t = stats.timings
    if t is not None:
        headers["X-Elastune-Prefill-Ms"] = f"{t.prefill_queue_ms + t.prefill_compute_ms:.3f}"
        headers["X-Elastune-KV-Transfer-Ms"] = f"{t.kv_transfer_ms:.3f}"
        headers["X-Elastune-Decode-Queue-Ms"] = f"{t.decode_queue_ms:.3f}"
    return headers
