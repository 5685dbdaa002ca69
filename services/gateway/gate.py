"""The gateway's door: limits, the caller's token budget and fleet admission, in that order.

HTTP and gRPC both call `Gate.admit` after tokenizing and `Gate.release` when the request
ends, so the two APIs cannot drift apart. A refusal is a `PipelineError`, which both APIs
already map to statuses: "invalid" -> 400 / INVALID_ARGUMENT, "overloaded" -> 429 /
RESOURCE_EXHAUSTED with Retry-After (HTTP header; gRPC: in the message and the
`retry-after-ms` trailer).
"""

from __future__ import annotations

import math
import time

import redis.asyncio as aioredis
import structlog
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .admission import ADMIT, TOO_LARGE, AdmissionPolicy, AdmissionRequest, FleetView, decide, summarize
from .budget import Charge, TokenBudgets
from .config import GatewayConfig
from .metrics import GatewayMetrics
from .pipeline import Pipeline, PipelineError
from .shared_budget import SharedBudgets

log = structlog.get_logger(__name__)
STORE_ERRORS = (aioredis.RedisError, OSError)

TIMEOUT_HEADER = "X-Request-Timeout"
TIMEOUT_FIELD = "timeout"


class Rejected(PipelineError):
    """A request refused at the door; `param` names the field at fault for bad input."""

    def __init__(self, kind: str, message: str, retry_after_s: float | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(kind, message, retry_after_s)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class Ticket:
    caller: str
    charged: int  # tokens taken from the caller's bucket


def retry_advice(seconds: float) -> str:
    return f"retry after {max(1, math.ceil(seconds))} s"


def parse_timeout(body: Mapping | None, headers: Mapping[str, str], config: GatewayConfig) -> float:
    """A request's end-to-end timeout: the body field `timeout` or the X-Request-Timeout header
    (seconds), else the configured default."""
    if isinstance(body, Mapping) and body.get(TIMEOUT_FIELD) is not None:
        raw, param = body[TIMEOUT_FIELD], TIMEOUT_FIELD
    elif headers.get(TIMEOUT_HEADER):
        raw, param = headers[TIMEOUT_HEADER], TIMEOUT_HEADER
    else:
        return config.default_timeout_s
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value <= config.max_timeout_s:  # NaN fails too
        raise Rejected("invalid", f"{param} must be a number of seconds > 0 and <= {config.max_timeout_s:g}, "
                                  f"got {str(raw)[:40]!r}", param=param)
    return value


class Gate:
    def __init__(self, config: GatewayConfig, pipeline: Pipeline, metrics: GatewayMetrics,
                 clock: Callable[[], float] = time.monotonic, store: aioredis.Redis | None = None):
        self.config = config
        self.pipeline = pipeline
        self.metrics = metrics
        self.policy = AdmissionPolicy(
            enabled=config.admission, ttft_slo_s=config.ttft_slo_s, kv_reserve_fraction=config.kv_reserve_fraction,
            min_retry_after_s=min(config.overload_retry_after_s, config.max_retry_after_s) or 1.0,
            max_retry_after_s=config.max_retry_after_s,
        )
        self.budgets = (TokenBudgets(config.key_tokens_per_s, config.burst_tokens, clock)
                        if config.key_tokens_per_s > 0 else None)
        self._fleet, self._fleet_of = FleetView(), (None, None)
        self.shared = (SharedBudgets(store, config.store_prefix, config.key_tokens_per_s, config.burst_tokens)
                       if self.budgets is not None and config.key_budget_shared and store is not None else None)

    def fleet(self) -> FleetView:
        """The fleet summary, recomputed only when the directory was re-read (new report lists)."""
        prefill, decode = self.pipeline.workers["prefill"], self.pipeline.workers["decode"]
        # holding the lists keeps their identity unique (an id() could be reused once freed)
        if self._fleet_of[0] is not prefill or self._fleet_of[1] is not decode:
            self._fleet = summarize(prefill, decode, self.policy)
            self._fleet_of = (prefill, decode)
        return self._fleet

    async def _charge(self, caller: str, cost: int) -> Charge:
        if self.shared is not None:
            try:
                return await self.shared.charge(caller, cost)
            except STORE_ERRORS as exc:  # keep serving on this gateway's own buckets
                log.warning("gateway.shared_budget_unavailable", error=str(exc)[:200])
        return self.budgets.charge(caller, cost)

    async def _refund(self, caller: str, tokens: int) -> None:
        if self.shared is not None:
            try:
                return await self.shared.refund(caller, tokens)
            except STORE_ERRORS as exc:
                log.warning("gateway.shared_budget_unavailable", error=str(exc)[:200])
        self.budgets.refund(caller, tokens)

    def check_prompt(self, prompt_tokens: int, param: str) -> None:
        limit = self.config.max_prompt_tokens
        if limit and prompt_tokens > limit:
            raise Rejected("invalid", f"{param} is {prompt_tokens} tokens; this server accepts at most {limit}",
                           param=param)

    async def admit(self, caller: str, prompt_tokens: int, max_tokens: int, timeout_s: float,
              max_tokens_param: str = "max_tokens") -> Ticket:
        cost = prompt_tokens + max_tokens
        if self.budgets is not None:
            if cost > self.budgets.burst:
                raise Rejected("invalid", f"prompt + {max_tokens_param} is {cost} tokens, more than this API key's "
                                          f"burst budget of {self.budgets.burst:.0f} tokens", param=max_tokens_param)
            charge = await self._charge(caller, cost)
            if not charge.ok:
                self.metrics.rejected.labels("budget").inc()
                raise Rejected("overloaded", f"this API key's token budget ({self.config.key_tokens_per_s:g} "
                                             f"tokens/s) is used up; {retry_advice(charge.retry_after_s)}",
                               charge.retry_after_s, code="rate_limit_exceeded")
        ticket = Ticket(caller, cost if self.budgets is not None else 0)
        verdict = decide(AdmissionRequest(prompt_tokens, max_tokens, timeout_s), self.fleet(), self.policy)
        if verdict.reason != ADMIT:
            await self.release(ticket, 0)
            self.metrics.rejected.labels(verdict.reason).inc()
            if verdict.reason == TOO_LARGE:
                raise Rejected("invalid", verdict.message, param=max_tokens_param)
            raise Rejected("overloaded", f"{verdict.message}; {retry_advice(verdict.retry_after_s)}",
                           verdict.retry_after_s, code="overloaded")
        return ticket

    async def release(self, ticket: Ticket | None, used_tokens: int) -> None:
        """The request ended having used `used_tokens` (prompt + completion): refund the rest."""
        if ticket is not None and self.budgets is not None and ticket.charged:
            await self._refund(ticket.caller, ticket.charged - used_tokens)
