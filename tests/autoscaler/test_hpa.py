"""The HPA arithmetic and behaviour rules, and KEDA's activation layer on top."""

from __future__ import annotations

import math

import pytest

from services.autoscaler.hpa import (
    HPA,
    HPABehavior,
    HPAScalingPolicy,
    HPAScalingRules,
    KedaScaledObjectState,
    MetricTarget,
    ScaleEvent,
    metric_value,
    replicas_for_metric,
    target_size,
)

AVG10 = MetricTarget("AverageValue", 10.0)


def test_keda_prefers_the_float_field_and_zeroes_bad_values() -> None:
    assert metric_value(20, 0.0) == 20.0
    assert metric_value(20, 3.5) == 3.5
    assert metric_value(7, -1.0) == 7.0  # a non-positive float falls back to the int
    assert metric_value(-5, 0.0) == 0.0
    assert metric_value(0, math.nan) == 0.0
    assert metric_value(0, 1.23456) == 1.234  # milli-quantised with truncation
    assert target_size(10, 0.0) == 10.0 and target_size(0, 6.111) == 6.111


def test_average_value_tolerance_edges() -> None:
    assert replicas_for_metric(AVG10, 21.0, current=2, ready=2) == 2  # ratio 1.05
    assert replicas_for_metric(AVG10, 23.0, current=2, ready=2) == 3  # ratio 1.15
    assert replicas_for_metric(AVG10, 19.0, current=2, ready=2) == 2  # ratio 0.95
    # |1 - 1.1| is 0.10000000000000009 in float64, just over the tolerance, as in Go.
    assert replicas_for_metric(AVG10, 22.0, current=2, ready=2) == 3
    assert replicas_for_metric(AVG10, 15.0, current=3, ready=3) == 2


def test_average_value_from_zero_and_value_targets() -> None:
    assert replicas_for_metric(AVG10, 0.0, current=0, ready=0) == 0  # NaN ratio: stay
    assert replicas_for_metric(AVG10, 25.0, current=0, ready=0) == 3  # +Inf ratio: ceil(v/t)
    value10 = MetricTarget("Value", 10.0)
    assert replicas_for_metric(value10, 30.0, current=2, ready=2) == 6  # ceil(2 * 3)
    assert replicas_for_metric(value10, 30.0, current=2, ready=1) == 3  # ready pods, not spec
    assert replicas_for_metric(value10, 10.5, current=4, ready=4) == 4  # inside tolerance
    assert replicas_for_metric(value10, 25.0, current=0, ready=0) == 3
    with pytest.raises(ValueError):
        MetricTarget("Utilization", 10.0)
    with pytest.raises(ValueError):
        MetricTarget("AverageValue", 0.0)


def test_threshold_10_follows_the_metric() -> None:
    hpa = HPA(min_replicas=1, max_replicas=10)
    assert hpa.desired(1, [(AVG10, 10.0)], now=0.0) == 1
    assert hpa.desired(1, [(AVG10, 20.0)], now=15.0) == 2
    assert hpa.events == [ScaleEvent(15.0, 1, 2)]


def test_capped_at_max() -> None:
    hpa = HPA(min_replicas=1, max_replicas=3)
    assert hpa.desired(1, [(MetricTarget("AverageValue", 6.111), 22.222)], now=0.0) == 3


def test_largest_metric_proposal_wins() -> None:
    hpa = HPA(min_replicas=1, max_replicas=10)
    assert hpa.desired(2, [(AVG10, 20.0), (MetricTarget("AverageValue", 5.0), 20.0)], now=0.0) == 4


def test_default_scale_up_rate_limit() -> None:
    hpa = HPA(min_replicas=1, max_replicas=100)
    assert hpa.desired(1, [(AVG10, 10_000.0)], now=0.0) == 5  # max(1 + 4, 2 * 1)
    assert hpa.desired(5, [(AVG10, 10_000.0)], now=10.0) == 5  # same period: starts from 1
    assert hpa.desired(5, [(AVG10, 10_000.0)], now=15.0) == 10  # event at 0 is not after 15 - 15
    assert hpa.desired(10, [(AVG10, 10_000.0)], now=30.0) == 20


def test_legacy_path_without_behavior() -> None:
    hpa = HPA(min_replicas=1, max_replicas=100, behavior=None)
    assert hpa.desired(1, [(AVG10, 10_000.0)], now=0.0) == 4  # max(2 * 1, 4)
    assert hpa.desired(4, [(AVG10, 10_000.0)], now=15.0) == 8
    # The legacy window keeps the max recommendation (1000) for 300 s in both directions,
    # so it goes on scaling up after the load has gone.
    assert hpa.desired(8, [(AVG10, 10.0)], now=30.0) == 16
    assert hpa.desired(16, [(AVG10, 10.0)], now=300.0) == 32  # the t=0 sample still counts
    assert hpa.desired(32, [(AVG10, 10.0)], now=316.0) == 1  # no scale-down rate limit


def test_default_scale_down_waits_for_the_window() -> None:
    hpa = HPA(min_replicas=1, max_replicas=10)
    assert hpa.desired(4, [(AVG10, 40.0)], now=0.0) == 4
    t, replicas = 15.0, 4
    while replicas == 4:
        replicas = hpa.desired(4, [(AVG10, 10.0)], now=t)
        t += 15.0
    assert t - 15.0 == 300.0  # the t=0 recommendation stops counting at exactly 300 s
    assert replicas == 1  # 100% per 15 s allows it all at once


def test_scale_down_pods_policy_and_select_policies() -> None:
    slow = HPAScalingRules(0, "Max", (HPAScalingPolicy("Pods", 1, 60),))
    hpa = HPA(1, 10, HPABehavior(scale_down=slow))
    assert hpa.desired(5, [(AVG10, 10.0)], now=0.0) == 4
    assert hpa.desired(4, [(AVG10, 10.0)], now=30.0) == 4  # period started at 5: 5 - 1
    assert hpa.desired(4, [(AVG10, 10.0)], now=61.0) == 3

    policies = (HPAScalingPolicy("Pods", 4, 15), HPAScalingPolicy("Percent", 100, 15))
    least = HPA(1, 100, HPABehavior(scale_up=HPAScalingRules(0, "Min", policies)))
    assert least.desired(10, [(AVG10, 1000.0)], now=0.0) == 14
    frozen = HPA(1, 100, HPABehavior(scale_up=HPAScalingRules(0, "Disabled", policies)))
    assert frozen.desired(10, [(AVG10, 1000.0)], now=0.0) == 10


def test_scale_up_stabilization_takes_the_min_over_the_window() -> None:
    rules = HPAScalingRules(60, "Max", (HPAScalingPolicy("Percent", 100, 15),))
    hpa = HPA(1, 20, HPABehavior(scale_up=rules))
    assert hpa.desired(2, [(AVG10, 20.0)], now=0.0) == 2
    assert hpa.desired(2, [(AVG10, 80.0)], now=15.0) == 2  # min(2, 8)
    assert hpa.desired(2, [(AVG10, 80.0)], now=61.0) == 4  # 8 wanted, 100% per 15 s


def test_bounds_and_scaling_disabled_at_zero() -> None:
    hpa = HPA(min_replicas=2, max_replicas=5)
    assert hpa.desired(0, [(AVG10, 100.0)], now=0.0) == 0  # ScalingDisabled: KEDA's job
    assert hpa.desired(9, [(AVG10, 100.0)], now=0.0) == 5
    assert hpa.desired(1, [(AVG10, 0.0)], now=0.0) == 2
    with pytest.raises(ValueError):
        hpa.desired(3, [], now=0.0)


def test_keda_threshold_10_scales_from_and_to_zero() -> None:
    keda = KedaScaledObjectState(min_replica_count=0, max_replica_count=10, cooldown_period_s=300)
    assert keda.step(0.0, True, [(AVG10, 10.0)], current_replicas=0) == 1  # KEDA: 0 -> 1
    assert keda.step(15.0, True, [(AVG10, 10.0)], current_replicas=1) == 1
    assert keda.step(30.0, True, [(AVG10, 20.0)], current_replicas=1) == 2
    replicas, t = 2, 45.0
    while replicas > 0:
        replicas = keda.step(t, False, [(AVG10, 0.0)], current_replicas=replicas)
        assert replicas >= 1 or t > 30.0 + 300.0  # not before the cooldown
        t += 15.0
    assert t - 15.0 <= 30.0 + 300.0 + 15.0
    moves = [(e.source, e.to_replicas) for e in keda.events]
    assert moves == [("keda", 1), ("hpa", 2), ("hpa", 1), ("keda", 0)]


def test_keda_min_one_never_goes_to_zero_and_idle_replicas() -> None:
    keda = KedaScaledObjectState(min_replica_count=1, max_replica_count=3)
    assert keda.step(1000.0, False, [(AVG10, 0.0)], current_replicas=1) == 1
    idle = KedaScaledObjectState(min_replica_count=2, max_replica_count=5, idle_replica_count=0)
    assert idle.step(0.0, True, [(AVG10, 0.0)], current_replicas=0) == 2
    assert idle.step(100.0, False, [(AVG10, 0.0)], current_replicas=2) == 2  # cooling down
    assert idle.step(301.0, False, [(AVG10, 0.0)], current_replicas=2) == 0
    never = KedaScaledObjectState(min_replica_count=0)
    assert never.step(0.0, False, [(AVG10, 0.0)], current_replicas=1) == 0  # no LastActiveTime
    with pytest.raises(ValueError):
        KedaScaledObjectState(min_replica_count=1, idle_replica_count=1)
