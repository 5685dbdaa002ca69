"""A request id carried across services: the gateway makes it, gRPC metadata carries it, and
every service binds it to its structlog context, so one grep finds a request's log lines in
every process.

Outgoing calls pass `metadata=outgoing_metadata()`; servers install `RequestIdInterceptor`
(the GrpcService skeleton does), which binds the id for the whole RPC: each RPC runs in its
own asyncio task, so the binding cannot leak into another request.
"""

from __future__ import annotations

import structlog
import grpc

METADATA_KEY = "x-request-id"  # gRPC metadata keys are lower case
LOG_KEY = "request_id"
MAX_LEN = 128


def bind_request_id(request_id: str) -> None:
    structlog.contextvars.bind_contextvars(**{LOG_KEY: request_id[:MAX_LEN]})


def unbind_request_id() -> None:
    structlog.contextvars.unbind_contextvars(LOG_KEY)


def current_request_id() -> str | None:
    return structlog.contextvars.get_contextvars().get(LOG_KEY)


def outgoing_metadata(request_id: str | None = None) -> tuple[tuple[str, str], ...]:
    """Metadata for a call made on behalf of the current (or the given) request."""
    rid = request_id or current_request_id()
    return ((METADATA_KEY, rid),) if rid else ()


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        rid = next((v for k, v in handler_call_details.invocation_metadata or () if k == METADATA_KEY), None)
        if isinstance(rid, str) and rid:
            bind_request_id(rid)
        else:
            unbind_request_id()
        return await continuation(handler_call_details)
