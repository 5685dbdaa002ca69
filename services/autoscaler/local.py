"""`elastune up --autoscale`: KEDA and the HPA, run locally from the same ScaledObject YAML as the cluster.

Per ScaledObject, every pollingInterval: per trigger GetMetricSpec, then per metric GetMetrics and IsActive,
over gRPC with KEDA's 3 s deadline. KEDA's executor moves 0 <-> 1 (idle) and applies the cooldown; otherwise
the HPA algorithm (services.autoscaler.hpa) takes the largest metric proposal. The result goes to a
ReplicaController. `external-push` triggers also hold a StreamIsActive stream open, and every pushed value
goes to KEDA's executor at once, as KEDA's push handler does. GetMetrics/IsActive failures count toward
spec.fallback (KEDA falls back once they exceed failureThreshold); GetMetricSpec failures do not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from services.autoscaler.events import (
    REASON_ACTIVATION,
    REASON_COOLDOWN,
    REASON_FALLBACK,
    REASON_HPA,
    EventLog,
    ScalingEvent,
    print_line,
)
from services.autoscaler.hpa import KedaScaledObjectState, MetricTarget, metric_value, target_size
from services.autoscaler.scaledobject import EXTERNAL_TRIGGERS, ScaledObject, Trigger
from services.common import keys
from services.common.tasks import raise_if_cancelling, spawn
from services.proto import externalscaler_pb2 as pb
from services.proto import externalscaler_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

SCALER_CALL_TIMEOUT_S = 3.0  # KEDA's deadline for a scaler's answer
PUSH_RETRY_FIRST_S = 2.0  # KEDA re-opens a broken StreamIsActive after 2 s, doubling each time...
PUSH_RETRY_MAX_S = 60.0  # ...up to a minute


class ReplicaController(Protocol):
    """The scale target of every stage: worker processes for the launcher, a dict in tests."""

    def current(self, stage: str) -> int:
        """Replicas asked for and not stopped yet (what a Deployment's spec.replicas says)."""

    def ready(self, stage: str) -> int:
        """Replicas that serve (registered in the store)."""

    async def scale(self, stage: str, replicas: int) -> None:
        """Start workers, or SIGTERM the newest first (they drain), until `replicas` remain."""


@dataclass
class _Poll:
    """One poll of a ScaledObject's triggers, as KEDA's scale loop and the HPA's metric query see it."""

    metrics: list[tuple[MetricTarget, float]] = field(default_factory=list)
    active: bool = False
    error: bool = False
    fallback: bool = False  # a failing metric was replaced by its fallback value


@dataclass
class _Scaled:
    """One ScaledObject and what KEDA and the HPA remember of it."""

    so: ScaledObject
    state: KedaScaledObjectState
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # KEDA's scalingMutex: polls and pushes
    specs: dict[int, list[tuple[str, MetricTarget]]] = field(default_factory=dict)  # trigger -> last good spec
    failures: dict[str, int] = field(default_factory=dict)  # "s{trigger}-{metric}" -> failures in a row


class LocalAutoscaler:
    """KEDA + HPA for a set of ScaledObjects; `run()` until `stop()`, or `reconcile()` one poll at a time."""

    def __init__(
        self,
        scaled_objects: Sequence[ScaledObject],
        controller: ReplicaController,
        *,
        address_override: Mapping[str, str] | None = None,
        store: aioredis.Redis | None = None,
        prefix: str = keys.DEFAULT_PREFIX,
        events_path: str | Path | None = None,
        echo: Callable[[str], None] | None = print_line,
        now: Callable[[], float] = time.time,
        call_timeout_s: float = SCALER_CALL_TIMEOUT_S,
    ):
        stages = [so.stage for so in scaled_objects]
        if len(set(stages)) != len(stages):
            raise ValueError(f"one ScaledObject per stage, got stages {stages}")
        for so in scaled_objects:
            for trigger in so.triggers:
                if trigger.type not in EXTERNAL_TRIGGERS:
                    raise ValueError(f"{so.source}: {so.name}: trigger type {trigger.type!r} is not supported "
                                     f"locally; use one of {EXTERNAL_TRIGGERS}")
        self.controller = controller
        self.address_override = dict(address_override or {})
        self.store = store
        self.prefix = prefix
        self.event_log = EventLog(events_path, echo)
        self.now = now
        self.call_timeout_s = call_timeout_s
        self._scaled = [_Scaled(so, so.state()) for so in scaled_objects]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: list[asyncio.Task] = []
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Poll every ScaledObject (the first poll at once) and hold push streams open until stop()."""
        for s in self._scaled:
            self._tasks.append(spawn(self._poll_loop(s), f"autoscaler.poll.{s.so.name}"))
            for index, trigger in enumerate(s.so.triggers):
                if trigger.push:
                    self._tasks.append(spawn(self._watch(s, index, trigger), f"autoscaler.push.{s.so.name}.{index}"))
        await self._stopping.wait()

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def reconcile(self) -> None:
        """One poll of every ScaledObject now (what each polling interval does)."""
        for s in self._scaled:
            await self._reconcile(s)

    async def _poll_loop(self, s: _Scaled) -> None:
        while True:
            try:
                await self._reconcile(s)
            except Exception as exc:  # a failed poll must not end the loop; the next one retries
                raise_if_cancelling(exc)
                log.exception("autoscaler.poll_failed", scaled_object=s.so.name)
            await asyncio.sleep(s.so.polling_interval_s)

    async def _reconcile(self, s: _Scaled) -> None:
        poll = _Poll()
        for index, trigger in enumerate(s.so.triggers):
            await self._poll_trigger(s, index, trigger, poll)
        async with s.lock:
            now = self.now()
            current, ready = self.controller.current(s.so.stage), self.controller.ready(s.so.stage)
            move = self._keda_move(s, poll.active, poll.error, current, now)
            if move is None:
                move = self._hpa_move(s, poll, current, ready, now)
            await self._apply(s, current, move[0], move[1], now)

    async def _poll_trigger(self, s: _Scaled, index: int, trigger: Trigger, poll: _Poll) -> None:
        """KEDA's external scaler: GetMetricSpec, then GetMetrics and IsActive per metric."""
        stub, ref = self._stub(trigger), _ref(s.so, trigger)
        try:
            reply = await stub.GetMetricSpec(ref, timeout=self.call_timeout_s)
            s.specs[index] = _metric_specs(reply, trigger)
        except (grpc.aio.AioRpcError, ValueError) as exc:
            # An error for KEDA's scale loop, not a fallback failure; the HPA keeps the spec it had.
            poll.error = True
            log.warning("autoscaler.metric_spec_failed", scaled_object=s.so.name, trigger=index, error=_text(exc))
        for name, target in s.specs.get(index, []):
            metric = f"s{index}-{name}"  # the HPA's name for it, and KEDA's health key
            try:
                request = pb.GetMetricsRequest(scaledObjectRef=ref, metricName=name)
                values = await stub.GetMetrics(request, timeout=self.call_timeout_s)
                active = await stub.IsActive(ref, timeout=self.call_timeout_s)
            except grpc.aio.AioRpcError as exc:
                poll.error = True
                s.failures[metric] = s.failures.get(metric, 0) + 1
                log.warning("autoscaler.metric_failed", metric=metric, failures=s.failures[metric], error=_text(exc))
                value = self._fallback_value(s, target, s.failures[metric])
                if value is not None:
                    poll.metrics.append((target, value))
                    poll.fallback = True
                continue
            s.failures[metric] = 0
            poll.active = poll.active or active.result
            if values.metricValues:  # none: the HPA has no value for this metric
                total = sum(metric_value(v.metricValue, v.metricValueFloat) for v in values.metricValues)
                poll.metrics.append((target, total))

    def _fallback_value(self, s: _Scaled, target: MetricTarget, failures: int) -> float | None:
        """KEDA's doFallback: a value that makes the HPA propose the fallback replicas (AverageValue only)."""
        fallback = s.so.fallback
        if fallback is None or target.type != "AverageValue" or failures <= fallback.failure_threshold:
            return None
        current, static = self.controller.current(s.so.stage), fallback.replicas
        replicas = {"static": static, "currentReplicas": current, "currentReplicasIfHigher": max(current, static),
                    "currentReplicasIfLower": min(current, static)}[fallback.behavior]
        return float(int(target.value) * replicas)  # KEDA truncates the target to an integer first

    def _keda_move(self, s: _Scaled, active: bool, error: bool, current: int, now: float) -> tuple[int, str] | None:
        """KEDA's executor (RequestScale): its own move and why, or None to leave the target to the HPA.

        A scaler error holds it back: while active it only scales from zero/idle (and keeps lastActiveTime);
        while inactive it never deactivates, unless fallback.replicas is 0.
        """
        so = s.so
        from_idle = current == 0 or (so.idle_replica_count is not None and current < so.min_replica_count)
        if error and active and not from_idle:
            return None
        if error and not active and not (so.fallback is not None and so.fallback.replicas == 0):
            return None
        target = s.state.activation(now, active, current)
        if target is not None:
            return target, REASON_ACTIVATION if target > current else REASON_COOLDOWN
        if not active and so.idle_replica_count is None and current < so.min_replica_count:
            return so.min_replica_count, REASON_ACTIVATION  # KEDA restores minReplicaCount
        return None

    def _hpa_move(self, s: _Scaled, poll: _Poll, current: int, ready: int, now: float) -> tuple[int, str]:
        hpa = s.state.hpa
        if not poll.metrics and hpa.min_replicas <= current <= hpa.max_replicas:
            return current, REASON_HPA  # no metric at all: the HPA cannot compute and leaves the scale alone
        desired = hpa.desired(current, poll.metrics, now, ready)
        return desired, REASON_FALLBACK if poll.fallback else REASON_HPA

    async def _apply(self, s: _Scaled, current: int, target: int, reason: str, now: float) -> None:
        if target != current:
            await self.controller.scale(s.so.stage, target)
            self.event_log.record(ScalingEvent(now, s.so.name, s.so.stage, current, target, reason))
        if self.store is not None:
            # The scaler's pending-pod guard reads it. Refreshed every poll; expires if the autoscaler stops,
            # so a stale count cannot hold the scaler back.
            ttl = max(3 * s.so.polling_interval_s, 30)
            try:
                await self.store.set(keys.asked_replicas(self.prefix, s.so.stage), target, ex=ttl)
            except RedisError as exc:
                log.warning("autoscaler.store_write_failed", stage=s.so.stage, error=repr(exc))

    async def _watch(self, s: _Scaled, index: int, trigger: Trigger) -> None:
        """KEDA's push scaler: hold StreamIsActive open; re-open it after 2 s, doubling to a minute."""
        retry = PUSH_RETRY_FIRST_S
        while True:
            call = self._stub(trigger).StreamIsActive(_ref(s.so, trigger))
            try:
                async for reply in call:
                    await self._on_push(s, reply.result)
            except grpc.aio.AioRpcError as exc:
                log.warning("autoscaler.push_stream_failed", scaled_object=s.so.name, trigger=index, error=_text(exc))
            finally:
                call.cancel()
            await asyncio.sleep(retry)
            retry = min(retry * 2, PUSH_RETRY_MAX_S)

    async def _on_push(self, s: _Scaled, active: bool) -> None:
        """A pushed IsActive goes straight to KEDA's executor, without error and without the HPA."""
        async with s.lock:
            now = self.now()
            current = self.controller.current(s.so.stage)
            move = self._keda_move(s, active, False, current, now)
            if move is None:
                return
            try:
                await self._apply(s, current, move[0], move[1], now)
            except Exception as exc:  # the stream stays open; the next poll or push retries
                raise_if_cancelling(exc)
                log.exception("autoscaler.push_scale_failed", scaled_object=s.so.name)

    def _stub(self, trigger: Trigger) -> pb_grpc.ExternalScalerStub:
        """One channel per scaler address, as KEDA pools its connections."""
        address = self.address_override.get(trigger.scaler_address, trigger.scaler_address)
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        return pb_grpc.ExternalScalerStub(channel)


def _ref(so: ScaledObject, trigger: Trigger) -> pb.ScaledObjectRef:
    return pb.ScaledObjectRef(name=so.name, namespace=so.namespace, scalerMetadata=dict(trigger.metadata))


def _metric_specs(reply: pb.GetMetricSpecResponse, trigger: Trigger) -> list[tuple[str, MetricTarget]]:
    """The HPA's metric targets; an empty list or a non-positive target is an error, as in KEDA."""
    if not reply.metricSpecs:
        raise ValueError("the scaler returned no metric spec")
    targets = [(m.metricName, target_size(m.targetSize, m.targetSizeFloat)) for m in reply.metricSpecs]
    return [(name, MetricTarget(trigger.metric_type, value)) for name, value in targets]


def _text(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
