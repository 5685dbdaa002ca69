"""What one stage looks like now, read from the store: StageSignals for the policy, and activity.

Sources, all under one store prefix:
- the stage's workers' load reports; draining workers are leaving and count for nothing;
- the gateways' reports (stage "gateway"): requests waiting for their first token need every
  stage (prefill, decode, and experts for MoE models) even while a stage has no worker, and
  requests streaming tokens need decode (and experts);
- `keys.asked_replicas(prefix, stage)`: the replicas last asked for; those not reporting yet
  are pending (absent: none pending).

Aggregation (`stage_view`, pure):
- ready_replicas: non-draining workers;
- token rates: the gateways' sums when any gateway reports (the arrival rates: prompt tokens
  in, output tokens out), else the workers' sums; an expert group (`experts/<group>`) always
  uses its servers' sums: tokens routed to the group per second (services/experts/server.py);
- queued tokens and queue length: the larger of the gateways' sum and the workers' sum. The
  gateway counts every request still waiting for a first token, which includes those queued at
  a prefill worker or waiting for a decode KV slot, so adding the two would count them twice;
- KV used/capacity: the workers' sums; oldest-deadline slack: the minimum over all reports;
- TTFT/ITL p95: the maximum over all reports that know it (0 ms means unknown -> None).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog

from ..common import keys
from ..common.load_report import LoadReport
from ..experts.placement import GROUP_STAGE_PREFIX
from .signals import StageSignals

log = structlog.get_logger(__name__)

GATEWAY_STAGE = "gateway"


@dataclass(frozen=True)
class StageView:
    signals: StageSignals
    active: bool  # the stage has work (queued, running or arriving), or work waits for it
    shares: tuple[float, ...] = ()  # the live workers' device shares (per-pod capacity, tuner table)
    model: str = ""  # what the live workers serve, and on what device
    device: str = ""


def _p95_s(reports: list[LoadReport], field_name: str) -> float | None:
    known = [getattr(r, field_name) for r in reports if getattr(r, field_name) > 0]
    return max(known) / 1000.0 if known else None


def _needs_first_token(gateway: LoadReport) -> bool:
    return gateway.queue_len > 0 or gateway.queued_tokens > 0 or gateway.prompt_tokens_per_s > 0


def _streams(gateway: LoadReport) -> bool:
    return gateway.running_seqs > 0 or gateway.output_tokens_per_s > 0


def _busy(worker: LoadReport) -> bool:
    return (
        worker.queue_len > 0
        or worker.queued_tokens > 0
        or worker.running_seqs > 0
        or worker.kv_used_tokens > 0
        or worker.prompt_tokens_per_s > 0
        or worker.output_tokens_per_s > 0
    )


def is_active(stage: str, workers: list[LoadReport], gateways: list[LoadReport]) -> bool:
    """True when the stage has work, or work waits for it (even at zero workers)."""
    live = [w for w in workers if not w.draining]
    if any(_busy(w) for w in live) or any(_needs_first_token(g) for g in gateways):
        return True
    return stage != "prefill" and any(_streams(g) for g in gateways)


def stage_view(
    stage: str, workers: list[LoadReport], gateways: list[LoadReport], asked: int | None, now: float
) -> StageView:
    """Aggregate the reports into one instant of the stage (see the module docstring)."""
    live = [w for w in workers if not w.draining]
    # An expert group's load is the tokens routed to it, which only its servers see (the skew).
    rate_from = gateways if gateways and not stage.startswith(GROUP_STAGE_PREFIX) else live
    everyone = live + gateways
    ready = len(live)
    signals = StageSignals(
        now=now,
        ready_replicas=ready,
        pending_replicas=max(asked - ready, 0) if asked is not None else 0,
        prompt_tokens_per_s=sum(r.prompt_tokens_per_s for r in rate_from),
        output_tokens_per_s=sum(r.output_tokens_per_s for r in rate_from),
        queued_tokens=float(max(sum(w.queued_tokens for w in live), sum(g.queued_tokens for g in gateways))),
        queue_len=max(sum(w.queue_len for w in live), sum(g.queue_len for g in gateways)),
        oldest_deadline_slack_s=min((r.oldest_deadline_slack_s for r in everyone), default=math.inf),
        kv_used_tokens=float(sum(w.kv_used_tokens for w in live)),
        kv_capacity_tokens=float(sum(w.kv_capacity_tokens for w in live)),
        ttft_p95_s=_p95_s(everyone, "ttft_ms_p95"),
        itl_p95_s=_p95_s(everyone, "itl_ms_p95"),
    )
    first = live[0] if live else None
    return StageView(signals, is_active(stage, workers, gateways), tuple(w.gpu_share for w in live),
                     first.model if first else "", first.device if first else "")


Reports = tuple[list[LoadReport], list[LoadReport], int | None]  # workers, gateways, asked


class SignalSource:
    """Reads a stage's reports from the store. Store errors (redis.RedisError, OSError) propagate.

    Reads of the same stage share one store read: one in flight, or one that succeeded less than
    `max_age_s` ago (workers publish about once a second, so a little more age changes little,
    and many ScaledObjects and streams watch the same few stages). 0: share in-flight reads only.
    """

    def __init__(self, store: aioredis.Redis, max_age_s: float = 0.0):
        self._store = store
        self._max_age_s = max_age_s
        self._reads: dict[tuple[str, str], tuple[float, asyncio.Future[Reports]]] = {}  # (started, read)

    async def read(self, prefix: str, stage: str, now: float) -> StageView:
        workers, gateways, asked = await self._shared_fetch(prefix, stage)
        return stage_view(stage, workers, gateways, asked, now)

    async def _shared_fetch(self, prefix: str, stage: str) -> Reports:
        key, started = (prefix, stage), time.monotonic()
        last = self._reads.get(key)
        if last is None or not self._reusable(*last, started):
            fetch = asyncio.ensure_future(self._fetch(prefix, stage))
            fetch.add_done_callback(_retrieve)
            self._reads[key] = last = (started, fetch)
        return await asyncio.shield(last[1])  # one caller's cancellation leaves the others' read alone

    def _reusable(self, started: float, fetch: asyncio.Future[Reports], now: float) -> bool:
        if not fetch.done():
            return True
        return not fetch.cancelled() and fetch.exception() is None and now - started <= self._max_age_s

    async def _fetch(self, prefix: str, stage: str) -> Reports:
        """WorkerDirectory.workers() for the stage and the gateways, plus the asked count, in two
        round trips (one pipeline, one MGET): this is most of the cost of a decision."""
        async with self._store.pipeline(transaction=False) as pipe:
            pipe.smembers(keys.stage_workers(prefix, stage))
            pipe.smembers(keys.stage_workers(prefix, GATEWAY_STAGE))
            pipe.get(keys.asked_replicas(prefix, stage))
            stage_ids, gateway_ids, asked = await pipe.execute()
        stage_ids = sorted(m.decode() for m in stage_ids)
        gateway_ids = sorted(m.decode() for m in gateway_ids)
        everyone = stage_ids + gateway_ids
        found = await self._store.mget([keys.worker_report(prefix, i) for i in everyone]) if everyone else []
        workers = await self._live(prefix, stage, stage_ids, found[: len(stage_ids)])
        gateways = await self._live(prefix, GATEWAY_STAGE, gateway_ids, found[len(stage_ids) :])
        return workers, gateways, _parse_asked(stage, asked)

    async def _live(self, prefix: str, stage: str, ids: list[str], found: list[bytes | None]) -> list[LoadReport]:
        expired = [i for i, data in zip(ids, found) if data is None]
        if expired:  # heartbeats stopped: prune them, as WorkerDirectory does
            await self._store.srem(keys.stage_workers(prefix, stage), *expired)
        return [LoadReport.from_bytes(data) for data in found if data is not None]


def _retrieve(fetch: asyncio.Future[Reports]) -> None:
    """Mark a failed read's exception retrieved, in case every caller was cancelled meanwhile."""
    if not fetch.cancelled():
        fetch.exception()


def _parse_asked(stage: str, raw: bytes | None) -> int | None:
    if raw is None:
        return None
    try:
        return max(int(raw), 0)
    except ValueError:
        log.warning("scaler.bad_asked_replicas", stage=stage, value=raw[:32])
        return None
