"""The issue's KEDA behaviour cases, end to end: load reports in the real store -> the real
scaler over gRPC -> the local autoscaler (KEDA + HPA) -> replica counts."""

from __future__ import annotations

import time
import uuid

import pytest

from services.autoscaler.local import LocalAutoscaler
from services.autoscaler.scaledobject import loads
from services.common.load_report import LoadReport
from services.common.registry import WorkerRegistration
from services.common.store import connect
from services.scaler.config import ScalerConfig
from services.scaler.server import ScalerService

SCALED_OBJECT = """
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {{name: elastune-prefill, namespace: elastune}}
spec:
  scaleTargetRef: {{name: elastune-prefill}}
  pollingInterval: 5
  cooldownPeriod: 60
  minReplicaCount: {min}
  maxReplicaCount: {max}
  advanced:
    horizontalPodAutoscalerConfig:
      behavior:
        scaleDown: {{stabilizationWindowSeconds: 0, policies: [{{type: Percent, value: 100, periodSeconds: 15}}]}}
  triggers:
    - type: external
      metadata:
        scalerAddress: elastune-scaler.elastune.svc:9090
        stage: prefill
        mode: raw
        tokensPerSecondPerPod: "{threshold}"
        targetUtilization: "1"
        emaHalfLifeSeconds: "0"
        decisionIntervalSeconds: "1"
        storePrefix: {prefix}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Replicas:
    def __init__(self, replicas: int) -> None:
        self.n = replicas

    def current(self, stage: str) -> int:
        return self.n

    ready = current

    async def scale(self, stage: str, replicas: int) -> None:
        self.n = replicas


@pytest.fixture
async def world(store_url):
    """(publish(rate), step(seconds) -> replicas, make(min, max, threshold, start))"""
    clock, store, prefix = Clock(), connect(store_url), f"keda-{uuid.uuid4().hex[:8]}"
    scaler = ScalerService(ScalerConfig(port=0, store_url=store_url, signal_max_age_s=0.0), clock=clock)
    await scaler.start()
    made = []

    async def publish(rate: float) -> None:
        report = LoadReport(worker_id="gw", stage="gateway", address="x:1", host_id="h", model="tiny",
                            timestamp_unix=time.time(), prompt_tokens_per_s=rate)
        await WorkerRegistration(store, prefix, lambda: report, ttl_s=600).publish()

    def make(min_: int, max_: int, threshold: float, start: int):
        (so,) = loads(SCALED_OBJECT.format(min=min_, max=max_, threshold=threshold, prefix=prefix), "test.yaml")
        replicas = Replicas(start)
        autoscaler = LocalAutoscaler([so], replicas, echo=None, now=clock,
                                     address_override={"elastune-scaler.elastune.svc:9090": f"127.0.0.1:{scaler.port}"})
        made.append(autoscaler)

        async def step(seconds: float = 15.0) -> int:
            clock.now += seconds
            await autoscaler.reconcile()
            return replicas.n

        return step

    yield publish, make
    for a in made:
        await a.stop()
    await scaler.stop(0.5)
    await store.aclose()


async def test_threshold_10(world):
    publish, make = world
    step = make(0, 10, 10, start=0)
    await publish(10)
    assert await step() == 1  # activated from zero, then 10 / 10
    await publish(20)
    assert await step() == 2
    await publish(0)
    assert await step() == 1  # the HPA's floor is 1 until KEDA's 60 s cooldown has passed
    assert await step(61) == 0


async def test_capped_at_max(world):
    publish, make = world
    step = make(1, 3, 6.111, start=1)
    await publish(22.222)
    assert await step() == 3  # ceil(22.222 / 6.111) = 4, capped at 3


async def test_hpa_tolerance_edges(world):
    publish, make = world
    step = make(1, 10, 10, start=2)
    await publish(21)
    assert await step() == 2  # 21 / (10 x 2) = 1.05: within the 10% tolerance
    await publish(23)
    assert await step() == 3  # 1.15: outside it, ceil(2.3)
