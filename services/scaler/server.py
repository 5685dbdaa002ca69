"""KEDA external scaler (`externalscaler.ExternalScaler`), one trigger per stage.

Each ScaledObject trigger names its stage and policy in its metadata (services/scaler/metadata.py).
Two modes:

- `desired` (default): the scaler runs elastune's policy (services/scaler/policy.py) and
  GetMetrics returns the desired replica count as metric `<stage>-desired-replicas` (an expert
  group "experts/<g>" gives `experts-<g>-desired-replicas`), with target 1. KEDA's default
  metricType, AverageValue, makes the HPA compute ceil(value / 1) = desired; do not set
  metricType: Value (it would multiply by the current count). The HPA still applies its
  tolerance: while |desired / current - 1| <= 0.1 it keeps the current count, so from 10
  replicas up a step of one is swallowed (11 wanted at 10 stays 10), although the policy has
  already applied its own dead band. Where the cluster allows, set the tolerance to 0:
  kube-controller-manager `--horizontal-pod-autoscaler-tolerance=0` (cluster-wide), or per HPA
  on Kubernetes >= 1.33 with the HPAConfigurableTolerance feature gate,
  `spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleUp.tolerance: "0"` (and scaleDown)
  in the ScaledObject, where the KEDA version passes that field on to the HPA. Keep the HPA's
  scale-down stabilization window short: the policy judges scale-down over its own window.
- `raw`: metric `<stage>-load-tokens-per-second` with target = tokensPerSecondPerPod x
  targetUtilization; GetMetrics returns the stage's smoothed load, tokens/s plus the queued
  tokens drained over queueDrainSeconds (policy.smoothed_load), and the HPA divides.

Wire format: both the float fields and the deprecated int64 fields are filled; KEDA reads the
float when > 0. Ints: targetSize = the target rounded half up, at least 1 (never non-positive);
metricValue = the value rounded up, so an int-only reader never sees a loaded stage as 0 and
desired counts pass through exactly.

GetMetricSpec depends on the metadata only, never on the store (KEDA's fallback counts only
GetMetrics/IsActive failures). GetMetrics answers from the ScaledObject's checkpoint: at most
one decision per decisionIntervalSeconds across all scaler replicas (services/scaler/checkpoint.py);
a replica answers a decision it has already seen without the store until it is one interval old,
so with the store down GetMetrics fails once the last decision is stale.
IsActive is true while the stage has work or work waits for it (services/scaler/signal_source.py);
StreamIsActive re-reads that every `stream_poll_s` and pushes a change at once, an unchanged value
at most every `stream_repeat_s`. All reads of one stage's reports within `signal_max_age_s` share
one store read, so a report reaches a stream within stream_poll_s + signal_max_age_s.
Bad metadata: INVALID_ARGUMENT naming the key; store unreachable: UNAVAILABLE (GetMetrics, IsActive).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable

import grpc
import redis.asyncio as aioredis
import structlog

from ..common import keys
from ..common.server import GrpcService
from ..common.store import connect
from ..proto import externalscaler_pb2 as pb
from ..proto import externalscaler_pb2_grpc as pb_grpc
from .capacity import TableCapacitySource
from .checkpoint import CheckpointStore, DecisionRecord
from .config import ScalerConfig
from .metadata import MODE_DESIRED, MetadataError, Trigger, parse_trigger
from .metrics import ScalerMetrics
from .policy import decide, smoothed_load
from .signal_source import SignalSource, StageView
from .signals import ControllerState
from .tls import server_credentials

log = structlog.get_logger(__name__)

STORE_ERRORS = (aioredis.RedisError, OSError)
_INDEX_PREFIX = re.compile(r"^s\d+-")  # KEDA's "s{index}-" in front of HPA metric names
_TRIGGER_CACHE_SIZE = 4096
_RECORD_CACHE_SIZE = 16384


def int_target(target: float) -> int:
    """The deprecated targetSize: rounded half up, at least 1."""
    return max(1, math.floor(target + 0.5))


def int_value(value: float) -> int:
    """The deprecated metricValue: rounded up (1e-9 absorbs float noise), at least 0."""
    return max(0, math.ceil(value - 1e-9))


def scaled_object_id(ref: pb.ScaledObjectRef) -> str:
    return f"{ref.namespace}/{ref.name}"


class ScalerService(GrpcService):
    name = "scaler"

    def __init__(self, config: ScalerConfig, clock: Callable[[], float] = time.time):
        super().__init__(config.host, config.port)
        if not config.store_url:
            raise ValueError("the scaler needs a store: set store_url (REDIS_URL)")
        self.config = config
        self.clock = clock  # unix seconds; decisions across replicas and restarts share it
        self.metrics = ScalerMetrics()
        self.store = connect(config.store_url)  # lazy: GetMetricSpec works with the store down
        self.signals = SignalSource(self.store, config.signal_max_age_s)
        self.checkpoints = CheckpointStore(self.store, config.checkpoint_ttl_s)
        self.capacity = TableCapacitySource(self.store)  # per-pod capacity from the tuning table
        self.stopping = asyncio.Event()
        self.open_streams = 0
        self._triggers: dict[tuple[tuple[str, str], ...], Trigger] = {}
        self._records: dict[str, DecisionRecord] = {}  # the last record seen per checkpoint key
        self._unknown_logged: set[str] = set()

    def add_servicers(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_ExternalScalerServicer_to_server(ExternalScalerServicer(self), server)

    def credentials(self) -> grpc.ServerCredentials | None:
        return server_credentials(self.config)  # TLS for KEDA: services/scaler/tls.py

    async def on_start(self) -> None:
        self.metrics.serve(self.config.metrics_host, self.config.metrics_port)

    async def drain(self, grace_s: float) -> None:
        self.stopping.set()  # open StreamIsActive calls end within one poll

    async def on_stop(self) -> None:
        self.metrics.close()
        await self.store.aclose()

    def trigger(self, ref: pb.ScaledObjectRef) -> Trigger:
        """The ScaledObject's parsed metadata (memoised); raises MetadataError."""
        cache_key = tuple(sorted(ref.scalerMetadata.items()))
        trigger = self._triggers.get(cache_key)
        if trigger is None:
            trigger = parse_trigger(ref.scalerMetadata, self.config.decision_interval_s, self.config.store_prefix)
            if len(self._triggers) >= _TRIGGER_CACHE_SIZE:
                self._triggers.clear()
            self._triggers[cache_key] = trigger
            for key in set(trigger.unknown_keys) - self._unknown_logged:
                self._unknown_logged.add(key)
                log.warning("scaler.unknown_metadata_key", key=key, scaled_object=scaled_object_id(ref))
        return trigger

    async def view(self, trigger: Trigger) -> StageView:
        return await self.signals.read(trigger.store_prefix, trigger.stage, self.clock())

    async def answer(self, ref: pb.ScaledObjectRef, trigger: Trigger) -> DecisionRecord:
        """The stored decision while it is fresh, else a new one (one per interval across replicas).

        No replica replaces a record before it is one interval old, so a fresh record seen
        before is still the stored one: it is answered without a store round trip.
        """
        key = keys.scaler_checkpoint(trigger.store_prefix, ref.namespace, ref.name, trigger.stage)
        now = self.clock()
        seen = self._records.get(key)
        if seen is not None and seen.is_fresh(now, trigger.decision_interval_s, trigger.mode):
            return seen
        version, stored = await self.checkpoints.load(key)
        if stored is not None and stored.is_fresh(now, trigger.decision_interval_s, trigger.mode):
            return self._remember(key, stored)
        view = await self.signals.read(trigger.store_prefix, trigger.stage, now)
        policy = await self.capacity.policy_for(trigger.store_prefix, trigger.policy, view)
        decision, state = decide(view.signals, policy, stored.state if stored else ControllerState())
        if trigger.mode == MODE_DESIRED:
            value = float(decision.desired)
        else:
            value = smoothed_load(view.signals, trigger.policy, state)
        signals = view.signals
        record = DecisionRecord(
            version + 1, trigger.mode, now, value, decision, state, signals.ready_replicas, signals.pending_replicas
        )
        commit = await self.checkpoints.commit(key, version, record)
        if not commit.won:
            self.metrics.lost_race(trigger.stage)
            return self._remember(key, commit.record)
        self.metrics.decided(trigger.stage, decision.reason)
        log.info(
            "scaler.decision", scaled_object=scaled_object_id(ref), stage=trigger.stage, mode=trigger.mode,
            desired=decision.desired, reason=decision.reason, value=round(value, 3),
            ready=signals.ready_replicas, pending=signals.pending_replicas,
            needs={name: round(need, 3) for name, need in decision.needs.items()},
        )
        return self._remember(key, record)

    def _remember(self, key: str, record: DecisionRecord) -> DecisionRecord:
        if len(self._records) >= _RECORD_CACHE_SIZE and key not in self._records:
            self._records.clear()
        self._records[key] = record
        return record


def _store_message(exc: BaseException) -> str:
    return f"the scaler cannot reach its store ({type(exc).__name__}: {exc}); retry later"


class ExternalScalerServicer(pb_grpc.ExternalScalerServicer):
    """Converts KEDA's messages at the boundary; the service works on Triggers and records."""

    def __init__(self, scaler: ScalerService):
        self.scaler = scaler

    async def _trigger(self, ref: pb.ScaledObjectRef, context: grpc.aio.ServicerContext) -> Trigger:
        try:
            return self.scaler.trigger(ref)
        except MetadataError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # unreachable: abort raises

    async def GetMetricSpec(self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext):
        trigger = await self._trigger(request, context)
        target = trigger.target
        spec = pb.MetricSpec(metricName=trigger.metric_name, targetSize=int_target(target), targetSizeFloat=target)
        return pb.GetMetricSpecResponse(metricSpecs=[spec])

    async def GetMetrics(self, request: pb.GetMetricsRequest, context: grpc.aio.ServicerContext):
        ref = request.scaledObjectRef
        trigger = await self._trigger(ref, context)
        asked = request.metricName
        if asked and _INDEX_PREFIX.sub("", asked) != trigger.metric_name:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"metricName {asked!r} is not served for stage {trigger.stage} in mode {trigger.mode}: "
                f"want {trigger.metric_name!r}",
            )
        try:
            record = await self.scaler.answer(ref, trigger)
        except STORE_ERRORS as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _store_message(exc))
        self.scaler.metrics.observe(trigger.stage, scaled_object_id(ref), record)
        value = pb.MetricValue(
            metricName=asked or trigger.metric_name, metricValue=int_value(record.value), metricValueFloat=record.value
        )
        return pb.GetMetricsResponse(metricValues=[value])

    async def IsActive(self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext):
        trigger = await self._trigger(request, context)
        try:
            view = await self.scaler.view(trigger)
        except STORE_ERRORS as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _store_message(exc))
        return pb.IsActiveResponse(result=view.active)

    async def StreamIsActive(self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext):
        trigger = await self._trigger(request, context)
        config, scaler = self.scaler.config, self.scaler
        last: bool | None = None
        sent_at = -math.inf
        store_down = False
        scaler.open_streams += 1
        try:
            while not scaler.stopping.is_set():
                try:
                    active = (await scaler.view(trigger)).active
                except STORE_ERRORS as exc:
                    if not store_down:
                        log.warning("scaler.stream_store_down", stage=trigger.stage, error=str(exc))
                    store_down = True
                else:
                    store_down = False
                    now = time.monotonic()
                    if active != last or now - sent_at >= config.stream_repeat_s:
                        yield pb.IsActiveResponse(result=active)
                        last, sent_at = active, now
                await asyncio.sleep(config.stream_poll_s)
        finally:
            scaler.open_streams -= 1


async def main(config: ScalerConfig) -> None:
    from ..common.server import run_until_signal

    await run_until_signal(ScalerService(config), config.drain_grace_s)
