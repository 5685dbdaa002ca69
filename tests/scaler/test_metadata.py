"""Trigger metadata parsing (services/scaler/metadata.py), directly and through the real gRPC server."""

from __future__ import annotations

import grpc
import pytest

from services.proto import externalscaler_pb2 as pb
from services.proto import externalscaler_pb2_grpc as pb_grpc
from services.scaler import metadata
from services.scaler.config import ScalerConfig
from services.scaler.metadata import KNOWN_KEYS, MetadataError, parse_trigger
from services.scaler.server import ScalerService

UNREACHABLE_STORE = "redis://127.0.0.1:1/0"  # nothing listens: metadata errors must not need the store

# (key, bad value, text the error must contain besides the key); None: the key is left out.
BAD_VALUES = [
    ("stage", None, "prefill, decode, experts, experts/<group>"),
    ("stage", "encode", "prefill, decode, experts, experts/<group>"),
    ("stage", "experts/", "experts/<group>"),
    ("stage", "experts/Group_A", "experts/<group>"),
    ("stage", "decode/x", "experts/<group>"),
    ("group", "g0", "needs stage experts"),  # the base metadata's stage is decode
    ("mode", "fast", "desired, raw"),
    ("mode", "", "empty"),
    ("tokensPerSecondPerPod", "0", "> 0"),
    ("tokensPerSecondPerPod", "lots", "> 0"),
    ("tokensPerSecondPerPod", "inf", "> 0"),
    ("targetUtilization", "1.5", "(0, 1]"),
    ("targetUtilization", "0", "(0, 1]"),
    ("emaHalfLifeSeconds", "-1", ">= 0"),
    ("sloTtftSeconds", "0", "> 0"),
    ("sloItlSeconds", "nan", "> 0"),
    ("queueDrainSeconds", "0", "> 0"),
    ("kvHighWatermark", "1.01", "(0, 1]"),
    ("minReplicas", "abc", "an integer in 0..1000"),
    ("minReplicas", "-1", "an integer in 0..1000"),
    ("minReplicas", "1.5", "an integer in 0..1000"),
    ("maxReplicas", "0", "an integer in 1..1000"),
    ("maxReplicas", "1001", "an integer in 1..1000"),
    ("scaleUpCooldownSeconds", "-5", ">= 0"),
    ("scaleDownCooldownSeconds", "soon", ">= 0"),
    ("scaleDownWindowSeconds", "-1", ">= 0"),
    ("scaleUpMaxPods", "0", "an integer in 1..1000"),
    ("scaleUpMaxPercent", "-10", ">= 0"),
    ("deadBand", "1", "[0, 1)"),
    ("gpuShare", "0", "(0, 1]"),
    ("decisionIntervalSeconds", "0", "> 0"),
    ("storePrefix", "has space", "letters, digits"),
]


@pytest.mark.parametrize(("key", "value", "allowed"), BAD_VALUES)
def test_bad_or_missing_value_names_the_key_and_what_is_allowed(key: str, value: str | None, allowed: str) -> None:
    meta = {"stage": "decode"}
    if value is None:
        meta.pop(key)
    else:
        meta[key] = value
    with pytest.raises(MetadataError) as caught:
        parse_trigger(meta)
    message = str(caught.value)
    assert key in message and allowed in message
    if value:
        assert repr(value) in message


def test_every_key_has_a_bad_value_case_and_a_documented_default() -> None:
    assert {key for key, _, _ in BAD_VALUES} == KNOWN_KEYS
    for key in KNOWN_KEYS:
        assert f"`{key}`" in (metadata.__doc__ or "")


def test_defaults() -> None:
    trigger = parse_trigger({"stage": "decode"}, default_interval_s=7.0, default_prefix="dep")
    policy = trigger.policy
    assert (trigger.stage, trigger.mode, trigger.decision_interval_s, trigger.store_prefix) == ("decode", "desired", 7.0, "dep")
    assert policy.pod_tokens_per_s() == 1000.0 and policy.target_utilization == 0.8
    assert (policy.ema_half_life_s, policy.queue_drain_target_s, policy.kv_high_watermark) == (30.0, 10.0, 0.85)
    assert policy.slo_ttft_s is None and policy.slo_itl_s is None
    assert (policy.min_replicas, policy.max_replicas, policy.dead_band, policy.gpu_share) == (1, 16, 0.1, 1.0)
    assert (policy.scale_up_cooldown_s, policy.scale_down_cooldown_s) == (15.0, 60.0)
    assert policy.scale_down_window_s == 300.0
    assert (policy.scale_up_max_step.pods, policy.scale_up_max_step.percent) == (4, 100.0)
    assert trigger.metric_name == "decode-desired-replicas" and trigger.target == 1.0
    assert policy.resolved_rate_source() == "output"


def test_every_value_reaches_the_policy() -> None:
    meta = {
        "stage": "experts/group-1", "mode": "raw", "tokensPerSecondPerPod": "500", "targetUtilization": "0.5",
        "emaHalfLifeSeconds": "0", "sloTtftSeconds": "0.5", "sloItlSeconds": "0.05", "queueDrainSeconds": "4",
        "kvHighWatermark": "0.9", "minReplicas": "0", "maxReplicas": "8", "scaleUpCooldownSeconds": "0",
        "scaleDownCooldownSeconds": "120", "scaleDownWindowSeconds": "600", "scaleUpMaxPods": "2",
        "scaleUpMaxPercent": "25", "deadBand": "0", "gpuShare": "0.25", "decisionIntervalSeconds": "2.5",
        "storePrefix": "prod:eu-1", "scalerAddress": "scaler:6000", "owner": "team-a",
    }
    trigger = parse_trigger(meta)
    p = trigger.policy
    assert (trigger.stage, trigger.mode, trigger.decision_interval_s, trigger.store_prefix) == (
        "experts/group-1", "raw", 2.5, "prod:eu-1"
    )
    assert (p.pod_tokens_per_s(), p.target_utilization, p.ema_half_life_s) == (500.0, 0.5, 0.0)
    assert (p.slo_ttft_s, p.slo_itl_s, p.queue_drain_target_s, p.kv_high_watermark) == (0.5, 0.05, 4.0, 0.9)
    assert (p.min_replicas, p.max_replicas, p.scale_up_cooldown_s, p.scale_down_cooldown_s) == (0, 8, 0.0, 120.0)
    assert (p.dead_band, p.gpu_share, p.resolved_rate_source()) == (0.0, 0.25, "total")
    assert p.scale_down_window_s == 600.0 and p.scale_up_max_step.up(4) == 2 and p.scale_up_max_step.up(12) == 3
    assert trigger.metric_name == "experts-group-1-load-tokens-per-second"  # no "/" in a metric name
    assert trigger.target == 250.0
    assert trigger.unknown_keys == ("owner",)  # scalerAddress is KEDA's own: not reported


def test_min_above_max_names_both_keys() -> None:
    with pytest.raises(MetadataError, match="minReplicas=5 exceeds maxReplicas=3"):
        parse_trigger({"stage": "prefill", "minReplicas": "5", "maxReplicas": "3"})


@pytest.fixture
async def stub():
    service = ScalerService(ScalerConfig(port=0, store_url=UNREACHABLE_STORE))
    await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    yield pb_grpc.ExternalScalerStub(channel)
    await channel.close()
    await service.stop(grace_s=0.5)


def _ref(**meta: str) -> pb.ScaledObjectRef:
    return pb.ScaledObjectRef(name="so", namespace="ns", scalerMetadata=meta)


async def _details(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details()


async def test_server_rejects_missing_stage(stub) -> None:
    code, details = await _details(stub.GetMetricSpec(_ref(mode="raw")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage" in details and "prefill, decode, experts" in details


async def test_server_rejects_bad_mode_before_touching_the_store(stub) -> None:
    request = pb.GetMetricsRequest(scaledObjectRef=_ref(stage="decode", mode="turbo"), metricName="decode-desired-replicas")
    code, details = await _details(stub.GetMetrics(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "mode='turbo'" in details and "desired, raw" in details


async def test_server_rejects_non_numeric_min_replicas(stub) -> None:
    code, details = await _details(stub.IsActive(_ref(stage="prefill", minReplicas="two")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "minReplicas='two'" in details and "integer in 0..1000" in details
    stream = stub.StreamIsActive(_ref(stage="prefill", minReplicas="two"))
    code, details = await _details(stream.read())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "minReplicas" in details
