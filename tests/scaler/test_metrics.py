"""The scaler's metrics: desired/current replicas and the reason of the decision answered."""

from __future__ import annotations

from prometheus_client import generate_latest

from services.scaler.checkpoint import DecisionRecord
from services.scaler.metrics import ScalerMetrics
from services.scaler.signals import ControllerState, Decision


def record(desired: int, reason: str, ready: int) -> DecisionRecord:
    return DecisionRecord(1, "desired", 0.0, float(desired), Decision(desired, reason), ControllerState(), ready, 0)


def value(metrics: ScalerMetrics, series: str) -> float | None:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_desired_current_and_only_the_last_reason_is_set():
    m = ScalerMetrics()
    m.observe("decode", "ns/so", record(3, "scale_up", ready=1))
    labels = 'scaled_object="ns/so",stage="decode"'
    assert value(m, f"elastune_scaler_desired_replicas{{{labels}}}") == 3
    assert value(m, f"elastune_scaler_current_replicas{{{labels}}}") == 1
    assert value(m, f'elastune_scaler_decision_reason{{reason="scale_up",{labels}}}') == 1
    m.observe("decode", "ns/so", record(3, "cooldown", ready=3))
    assert value(m, f'elastune_scaler_decision_reason{{reason="scale_up",{labels}}}') == 0
    assert value(m, f'elastune_scaler_decision_reason{{reason="cooldown",{labels}}}') == 1
    m.observe("prefill", "ns/other", record(1, "hold", ready=1))  # other objects keep their own
    assert value(m, f'elastune_scaler_decision_reason{{reason="cooldown",{labels}}}') == 1
