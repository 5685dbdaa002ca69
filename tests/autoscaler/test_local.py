"""The local autoscaler against a real ExternalScaler gRPC peer whose answers the test scripts."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from services.autoscaler.events import print_line
from services.autoscaler.local import LocalAutoscaler
from services.autoscaler.scaledobject import ScaledObject, Trigger, parse
from services.common import keys
from services.common.store import connect
from services.proto import externalscaler_pb2 as pb
from services.proto import externalscaler_pb2_grpc as pb_grpc

CLUSTER_ADDRESS = "elastune-scaler.elastune.svc:9090"
TARGET = 10.0  # every scripted metric's AverageValue target
FAST_DOWN = {"scaleDown": {"stabilizationWindowSeconds": 0, "policies": [{"type": "Percent", "value": 100,
                                                                          "periodSeconds": 15}]}}


class ScriptedScaler(pb_grpc.ExternalScalerServicer):
    """Answers with the values the test sets; each trigger's metadata `metric` names its metric."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.active = False
        self.failing: set[str] = set()  # RPC names that abort with UNAVAILABLE
        self.pushes: asyncio.Queue[bool] = asyncio.Queue()
        self.calls: list[str] = []
        self.refs: list[pb.ScaledObjectRef] = []
        self.address = ""  # host:port, once the server listens
        self.autoscalers: list[LocalAutoscaler] = []  # stopped with the server

    async def _check(self, rpc: str, context: grpc.aio.ServicerContext) -> None:
        self.calls.append(rpc)
        if rpc in self.failing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"scripted {rpc} outage")

    async def GetMetricSpec(self, request, context):
        await self._check("GetMetricSpec", context)
        self.refs.append(request)
        spec = pb.MetricSpec(metricName=request.scalerMetadata["metric"], targetSize=1, targetSizeFloat=TARGET)
        return pb.GetMetricSpecResponse(metricSpecs=[spec])

    async def GetMetrics(self, request, context):
        await self._check("GetMetrics", context)
        value = pb.MetricValue(metricName=request.metricName, metricValueFloat=self.values.get(request.metricName, 0))
        return pb.GetMetricsResponse(metricValues=[value])

    async def IsActive(self, request, context):
        await self._check("IsActive", context)
        return pb.IsActiveResponse(result=self.active)

    async def StreamIsActive(self, request, context):
        self.calls.append("StreamIsActive")
        while True:
            yield pb.IsActiveResponse(result=await self.pushes.get())


class Replicas:
    """An in-memory ReplicaController: stage -> replicas, every scale call recorded."""

    def __init__(self, **stages: int) -> None:
        self.replicas = dict(stages)
        self.calls: list[tuple[str, int]] = []

    def current(self, stage: str) -> int:
        return self.replicas[stage]

    ready = current  # every replica serves at once here

    async def scale(self, stage: str, replicas: int) -> None:
        self.calls.append((stage, replicas))
        self.replicas[stage] = replicas


class Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def scaler():
    servicer = ScriptedScaler()
    server = grpc.aio.server()
    pb_grpc.add_ExternalScalerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    for auto in servicer.autoscalers:
        await auto.stop()
    await server.stop(0)


def scaled_object(stage: str = "prefill", metrics: tuple[str, ...] = ("load",), push: bool = False,
                  behavior: dict | None = None, **spec: Any) -> ScaledObject:
    triggers = [{"type": "external-push" if push else "external",
                 "metadata": {"scalerAddress": CLUSTER_ADDRESS, "stage": stage, "metric": m}} for m in metrics]
    body: dict[str, Any] = {"scaleTargetRef": {"name": f"elastune-{stage}"}, "triggers": triggers,
                            "minReplicaCount": 1, **spec}  # 1 as in k8s/base unless a test says otherwise
    if behavior is not None:
        body["advanced"] = {"horizontalPodAutoscalerConfig": {"behavior": behavior}}
    doc = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": f"so-{stage}"}, "spec": body}
    return parse(doc, "test")


async def until(condition: Callable[[], bool], timeout_s: float = 3.0) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, "timed out"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def autoscaler(so: ScaledObject, replicas: Replicas, scaler: ScriptedScaler, clock: Clock | None = None,
               **kwargs: Any) -> LocalAutoscaler:
    """An autoscaler dialing `scaler` for the cluster address; stopped when the test ends."""
    kwargs.setdefault("echo", None)
    auto = LocalAutoscaler([so], replicas, address_override={CLUSTER_ADDRESS: scaler.address},
                           now=clock or time.time, **kwargs)
    scaler.autoscalers.append(auto)
    return auto


async def test_average_value_sets_replicas_and_publishes_the_ask(scaler, store_url):
    replicas, store, prefix = Replicas(prefill=1), connect(store_url), f"test-{uuid.uuid4().hex[:8]}"
    auto = autoscaler(scaled_object(maxReplicaCount=10), replicas, scaler, store=store, prefix=prefix)
    scaler.values["load"] = 10.0  # target 10 per pod -> 1
    await auto.reconcile()
    assert replicas.calls == [] and replicas.replicas["prefill"] == 1
    assert await store.get(keys.asked_replicas(prefix, "prefill")) == b"1"
    scaler.values["load"] = 20.0  # -> 2
    await auto.reconcile()
    assert replicas.calls == [("prefill", 2)]
    assert await store.get(keys.asked_replicas(prefix, "prefill")) == b"2"
    assert 0 < await store.ttl(keys.asked_replicas(prefix, "prefill")) <= 90
    assert [(e.from_replicas, e.to_replicas, e.reason) for e in auto.event_log.events] == [(1, 2, "hpa")]
    assert scaler.calls[:3] == ["GetMetricSpec", "GetMetrics", "IsActive"]
    # KEDA hands the scaler every metadata key (the cluster address too), under the ScaledObject's name.
    ref = scaler.refs[0]
    assert (ref.name, ref.namespace) == ("so-prefill", "default")
    assert dict(ref.scalerMetadata) == {"scalerAddress": CLUSTER_ADDRESS, "stage": "prefill", "metric": "load"}
    await store.aclose()


async def test_activation_from_zero_then_cooldown_back_to_zero(scaler, tmp_path, capsys):
    clock, replicas = Clock(), Replicas(prefill=0)
    so, events_file = scaled_object(minReplicaCount=0, cooldownPeriod=30), tmp_path / "events.jsonl"
    auto = autoscaler(so, replicas, scaler, clock, events_path=events_file, echo=print_line)
    await auto.reconcile()  # inactive at zero: nothing
    assert replicas.calls == []
    scaler.active, scaler.values["load"] = True, 30.0
    await auto.reconcile()  # KEDA activates: 0 -> 1, the HPA waits for the next poll
    assert replicas.replicas["prefill"] == 1
    clock.t += 5
    await auto.reconcile()  # the HPA: 30 / 10 -> 3
    assert replicas.replicas["prefill"] == 3
    scaler.active, scaler.values["load"] = False, 0.0
    clock.t += 20
    await auto.reconcile()  # inactive within the cooldown: KEDA waits (and the HPA holds, window 300 s)
    assert replicas.replicas["prefill"] == 3
    clock.t += 11  # 31 s after the last active poll
    await auto.reconcile()
    assert replicas.replicas["prefill"] == 0
    reasons = [(e.from_replicas, e.to_replicas, e.reason) for e in auto.event_log.events]
    assert reasons == [(0, 1, "activation"), (1, 3, "hpa"), (3, 0, "cooldown")]
    lines = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert [(d["from"], d["to"], d["reason"]) for d in lines] == reasons
    assert (lines[0]["time"], lines[0]["stage"], lines[0]["scaled_object"]) == (1000.0, "prefill", "so-prefill")
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == "autoscaler: so-prefill (prefill) 3 -> 0 replicas [cooldown]"


async def test_pushed_true_scales_from_zero_at_once(scaler):
    replicas = Replicas(decode=0)
    auto = autoscaler(scaled_object("decode", push=True, minReplicaCount=0, pollingInterval=60), replicas, scaler)
    run = asyncio.create_task(auto.run())
    await until(lambda: "IsActive" in scaler.calls and "StreamIsActive" in scaler.calls)  # first poll, stream
    assert replicas.replicas["decode"] == 0
    await scaler.pushes.put(True)
    assert await until(lambda: replicas.replicas["decode"] == 1) < 0.5  # not the 60 s polling interval
    assert replicas.calls == [("decode", 1)]
    assert auto.event_log.events[0].reason == "activation"
    await scaler.pushes.put(False)  # KEDA hands `false` to its executor too: within the cooldown it waits
    await asyncio.sleep(0.1)
    assert replicas.replicas["decode"] == 1
    await auto.stop()
    await asyncio.wait_for(run, 1)  # run() returns once stopped


@pytest.mark.parametrize("failing", ["GetMetrics", "IsActive"])
async def test_fallback_after_failures_then_recovery(scaler, failing):
    clock, replicas = Clock(), Replicas(prefill=1)
    so = scaled_object(maxReplicaCount=10, behavior=FAST_DOWN,
                       fallback={"failureThreshold": 2, "replicas": 4})
    auto = autoscaler(so, replicas, scaler, clock)
    scaler.values["load"] = 10.0  # 1 replica while the scaler answers
    seen = []
    for fails in (False, True, True, True, False, True):
        scaler.failing = {failing} if fails else set()
        clock.t += 5
        await auto.reconcile()
        seen.append(replicas.replicas["prefill"])
    # KEDA falls back once the failures in a row exceed failureThreshold; an answer resets the count.
    assert seen == [1, 1, 1, 4, 1, 1]
    assert [e.reason for e in auto.event_log.events] == ["fallback", "hpa"]

async def test_metric_spec_failures_never_trigger_fallback(scaler):
    clock, replicas = Clock(), Replicas(prefill=1)
    auto = autoscaler(scaled_object(fallback={"failureThreshold": 0, "replicas": 5}), replicas, scaler, clock)
    scaler.failing.add("GetMetricSpec")
    for _ in range(4):
        clock.t += 5
        await auto.reconcile()
    assert replicas.calls == [] and "GetMetrics" not in scaler.calls


async def test_errors_without_fallback_block_deactivation(scaler):
    clock, replicas = Clock(), Replicas(prefill=1)
    auto = autoscaler(scaled_object(minReplicaCount=0, cooldownPeriod=0), replicas, scaler, clock)
    scaler.failing.add("IsActive")
    clock.t += 5
    await auto.reconcile()  # inactive only because the scaler fails: KEDA keeps the replica
    assert replicas.replicas["prefill"] == 1
    scaler.failing.clear()
    clock.t += 5
    await auto.reconcile()  # truly inactive: down to zero (no lastActiveTime, so no cooldown)
    assert replicas.replicas["prefill"] == 0


async def test_scale_down_waits_for_the_stabilization_window_then_one_pod_per_period(scaler):
    clock, replicas = Clock(), Replicas(prefill=1)
    behavior = {"scaleDown": {"stabilizationWindowSeconds": 60,
                              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 15}]}}
    auto = autoscaler(scaled_object(behavior=behavior), replicas, scaler, clock)
    scaler.values["load"] = 40.0
    await auto.reconcile()
    assert replicas.replicas["prefill"] == 4
    scaler.values["load"] = 10.0
    seen = {}
    for dt in (10, 40, 11, 1, 15):  # t = 10, 50, 61, 62, 77 s after the peak
        clock.t += dt
        await auto.reconcile()
        seen[clock.t - 1000] = replicas.replicas["prefill"]
    assert seen == {10: 4, 50: 4, 61: 3, 62: 3, 77: 2}


@pytest.mark.parametrize("behavior,first", [({}, 5), (None, 4)])  # None: the legacy cap max(2 x 1, 4)
async def test_two_triggers_take_the_larger_proposal(scaler, behavior, first):
    clock, replicas = Clock(), Replicas(prefill=1)
    auto = autoscaler(scaled_object(metrics=("a", "b"), behavior=behavior), replicas, scaler, clock)
    scaler.values.update(a=30.0, b=50.0)
    await auto.reconcile()
    assert replicas.replicas["prefill"] == first
    scaler.values.update(a=70.0)
    clock.t += 15
    await auto.reconcile()
    assert replicas.replicas["prefill"] == 7


async def test_run_polls_every_interval_until_stopped(scaler):
    replicas = Replicas(prefill=1)
    auto = autoscaler(scaled_object(pollingInterval=1), replicas, scaler)
    run = asyncio.create_task(auto.run())
    await until(lambda: "IsActive" in scaler.calls)  # the first poll, at once
    scaler.values["load"] = 20.0  # seen by the second poll, a polling interval later
    assert 0.8 < await until(lambda: bool(replicas.calls)) < 2.0
    assert replicas.calls == [("prefill", 2)]
    await auto.stop()
    await asyncio.wait_for(run, 1)
    polls = scaler.calls.count("GetMetricSpec")
    await asyncio.sleep(1.1)
    assert scaler.calls.count("GetMetricSpec") == polls  # no poll after stop


def test_only_external_triggers_and_one_object_per_stage() -> None:
    so = scaled_object()
    with pytest.raises(ValueError, match="one ScaledObject per stage"):
        LocalAutoscaler([so, so], Replicas(prefill=1))
    cpu = dataclasses.replace(so, triggers=(Trigger("cpu", {"stage": "prefill"}, "Utilization"),))
    with pytest.raises(ValueError, match="'cpu' is not supported locally"):
        LocalAutoscaler([cpu], Replicas(prefill=1))
