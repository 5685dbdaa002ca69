"""gRPC `Gateway.Generate` for gRPC clients: same admission and pipeline as the HTTP API."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import grpc

from ..common.convert import BadRequest, check_prompt, sampling_from_proto
from ..common.request_context import bind_request_id
from ..common.types import GenerationRequest
from .auth import Unauthorized
from ..proto import inference_pb2 as pb
from ..proto import inference_pb2_grpc as pb_grpc
from .generation import RequestStats, generate
from .pipeline import PipelineError

if TYPE_CHECKING:
    from .server import Gateway

STATUS = {
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "failed": grpc.StatusCode.INTERNAL,
}


class GatewayServicer(pb_grpc.GatewayServicer):
    def __init__(self, gateway: "Gateway"):
        self.gw = gateway

    def _admit(self, request: pb.GenerateRequest) -> GenerationRequest:
        gw = self.gw
        if request.model and request.model != gw.model_name:
            raise BadRequest(f"model {request.model!r} is not served here; this gateway serves {gw.model_name!r}")
        if bool(request.prompt) == bool(request.prompt_token_ids):
            raise BadRequest("set exactly one of prompt and prompt_token_ids")
        if not request.sampling.max_tokens:
            raise BadRequest(f"sampling.max_tokens must be between 1 and {gw.limits.max_tokens_limit}")
        if request.sampling.max_tokens > gw.limits.max_tokens_limit:
            raise BadRequest(f"sampling.max_tokens must be <= {gw.limits.max_tokens_limit}, got {request.sampling.max_tokens}")
        params = sampling_from_proto(request.sampling)
        prompt = list(request.prompt_token_ids) or gw.tokenizer.encode_text(request.prompt)
        check_prompt(prompt, gw.tokenizer.vocab_size, gw.limits.max_model_len, params.max_tokens)
        if len(request.stop) > gw.limits.max_stop_strings or any(not s for s in request.stop):
            raise BadRequest(f"stop takes at most {gw.limits.max_stop_strings} non-empty strings")
        if not 0 <= request.timeout_s <= gw.config.max_timeout_s:  # NaN fails too
            raise BadRequest(f"timeout_s must be between 0 (the default, {gw.config.default_timeout_s:g} s) and "
                             f"{gw.config.max_timeout_s:g}, got {request.timeout_s}")
        gw.gate.check_prompt(len(prompt), "prompt")
        return GenerationRequest(
            request_id=request.request_id or f"gen-{uuid.uuid4().hex}",
            prompt_token_ids=tuple(prompt),
            sampling=params,
            stop=tuple(request.stop),
            timeout_s=request.timeout_s,
        )

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        gw = self.gw
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        try:
            caller = gw.auth.identify(metadata.get("authorization"))
        except Unauthorized as exc:
            gw.metrics.rejected.labels("unauthorized").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{exc} (gRPC metadata 'authorization')")
        stats = RequestStats()
        ticket = None
        try:
            req = self._admit(request)
            bind_request_id(req.request_id)
            timeout = req.timeout_s or gw.config.default_timeout_s
            remaining = context.time_remaining()  # the client's own deadline, if it set one
            if remaining is not None:
                timeout = min(timeout, remaining)
            ticket = await gw.gate.admit(caller, len(req.prompt_token_ids), req.sampling.max_tokens, timeout,
                                   "sampling.max_tokens")
        except BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except PipelineError as exc:
            await self._abort(context, exc)
        deltas = generate(gw.pipeline, gw.tokenizer.tokenizer, req, timeout, stats)
        try:
            async for delta in deltas:
                last = delta.finish_reason is not None
                msg = pb.GenerateResponse(request_id=req.request_id, text=delta.text, token_ids=delta.token_ids,
                                          finish_reason=delta.finish_reason or "")
                if last:
                    msg.usage.prompt_tokens = len(req.prompt_token_ids)
                    msg.usage.completion_tokens = stats.completion_tokens
                    if stats.timings is not None:
                        msg.timings.CopyFrom(stats.timings)
                yield msg
        except PipelineError as exc:
            await self._abort(context, exc)
        finally:
            await deltas.aclose()
            used = len(req.prompt_token_ids) if stats.first_token_at is not None else 0
            await gw.gate.release(ticket, used + stats.completion_tokens)

    async def _abort(self, context: grpc.aio.ServicerContext, exc: PipelineError) -> None:
        if exc.retry_after_s is not None:
            context.set_trailing_metadata((("retry-after-ms", str(int(exc.retry_after_s * 1000))),))
        await context.abort(STATUS[exc.kind], str(exc))
