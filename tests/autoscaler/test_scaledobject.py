"""ScaledObject YAML -> typed objects: the repo's manifests, KEDA's and Kubernetes' defaults, and bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.autoscaler.hpa import DEFAULT_SCALE_DOWN, DEFAULT_SCALE_UP, HPAScalingPolicy
from services.autoscaler.scaledobject import Fallback, load_dir, load_file, loads, scaler_addresses

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: so}
spec:
  scaleTargetRef: {name: elastune-prefill}
  triggers:
    - type: external
      metadata: {scalerAddress: "scaler:9090", stage: prefill}
"""


def _with_spec(extra: str) -> str:
    """MINIMAL with more lines under `spec:` (indented by two spaces in `extra`)."""
    return MINIMAL.replace("spec:\n", "spec:\n" + extra, 1)


def test_repo_manifests_parse_to_the_two_stages() -> None:
    objects = {so.stage: so for so in load_dir(REPO / "k8s/base")}
    assert set(objects) == {"prefill", "decode", "experts/g0"}  # scaledobject-experts-g0.yaml: stage experts, group g0
    prefill, decode = objects["prefill"], objects["decode"]
    assert (prefill.name, prefill.namespace, prefill.target) == ("elastune-prefill", "elastune", "elastune-prefill")
    assert decode.target == "elastune-decode" and decode.triggers[0].push and not prefill.triggers[0].push
    assert (prefill.polling_interval_s, prefill.min_replica_count, prefill.max_replica_count) == (5, 1, 8)
    assert prefill.fallback == Fallback(failure_threshold=3, replicas=2, behavior="currentReplicasIfHigher")
    assert prefill.behavior is not None and decode.behavior is not None
    assert prefill.behavior.scale_down.policies == (HPAScalingPolicy("Pods", 1, 60),)
    assert decode.behavior.scale_down.stabilization_window_s > prefill.behavior.scale_down.stabilization_window_s
    assert scaler_addresses(objects.values()) == {"elastune-scaler.elastune.svc:9090"}
    state = prefill.state()  # KEDA's executor over a HPA whose floor is max(minReplicaCount, 1)
    assert (state.hpa.min_replicas, state.hpa.max_replicas, state.cooldown_period_s) == (1, 8, 300.0)


def test_keda_defaults_and_the_legacy_hpa_path() -> None:
    (so,) = loads(MINIMAL)
    assert (so.name, so.namespace, so.target, so.stage) == ("so", "default", "elastune-prefill", "prefill")
    assert (so.polling_interval_s, so.cooldown_period_s) == (30, 300)
    assert (so.min_replica_count, so.max_replica_count, so.idle_replica_count) == (0, 100, None)
    assert so.behavior is None  # no behavior: the HPA's legacy path, exactly as Kubernetes does
    assert so.tolerance == 0.1
    assert so.fallback is None
    assert so.triggers[0].metric_type == "AverageValue" and so.triggers[0].scaler_address == "scaler:9090"


def test_behavior_fields_default_one_by_one_as_kubernetes_does() -> None:
    text = _with_spec(
        "  advanced:\n"
        "    horizontalPodAutoscalerConfig:\n"
        "      behavior:\n"
        "        scaleDown: {stabilizationWindowSeconds: 30}\n"
    )
    (so,) = loads(text)
    assert so.behavior is not None
    assert so.behavior.scale_up == DEFAULT_SCALE_UP
    assert so.behavior.scale_down.stabilization_window_s == 30
    assert so.behavior.scale_down.policies == DEFAULT_SCALE_DOWN.policies
    assert so.behavior.scale_down.select_policy == "Max"


@pytest.mark.parametrize("up,down,expected", [("0", "0", 0.0), ('"50m"', '"50m"', 0.05), ('"0.2"', "0.2", 0.2)])
def test_tolerance_quantities(up: str, down: str, expected: float) -> None:
    text = _with_spec(
        "  advanced:\n"
        "    horizontalPodAutoscalerConfig:\n"
        f"      behavior: {{scaleUp: {{tolerance: {up}}}, scaleDown: {{tolerance: {down}}}}}\n"
    )
    (so,) = loads(text)
    assert so.tolerance == pytest.approx(expected) and so.state().hpa.tolerance == pytest.approx(expected)


@pytest.mark.parametrize(
    "behavior", ["{scaleUp: {tolerance: 0}}", '{scaleUp: {tolerance: "x"}, scaleDown: {tolerance: "x"}}']
)
def test_tolerance_must_be_one_valid_quantity(behavior: str) -> None:
    text = _with_spec(f"  advanced: {{horizontalPodAutoscalerConfig: {{behavior: {behavior}}}}}\n")
    with pytest.raises(ValueError, match=r"behavior\.(scaleUp|scaleDown)\.tolerance"):
        loads(text, "bad.yaml")


def test_multi_document_files_skip_other_kinds(tmp_path: Path) -> None:
    deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: elastune-prefill}\n"
    decode = MINIMAL.replace("name: so", "name: so2").replace("stage: prefill", "stage: decode")
    (tmp_path / "all.yaml").write_text("---\n".join([deployment, MINIMAL, "", decode]))
    (tmp_path / "notes.txt").write_text("not yaml: [")
    (tmp_path / "kustomization.yml").write_text("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n")
    objects = load_dir(tmp_path)
    assert [(so.name, so.stage) for so in objects] == [("so", "prefill"), ("so2", "decode")]
    assert load_file(tmp_path / "all.yaml")[0].source == str(tmp_path / "all.yaml")


def test_fallback_and_idle_parse() -> None:
    text = _with_spec(
        "  minReplicaCount: 2\n"
        "  idleReplicaCount: 0\n"
        "  fallback: {failureThreshold: 4, replicas: 3}\n"
    )
    (so,) = loads(text)
    assert so.fallback == Fallback(4, 3, "static")
    assert so.idle_replica_count == 0 and so.state().idle_replica_count == 0


@pytest.mark.parametrize(
    "extra,field",
    [
        ("  pollingInterval: 0\n", "spec.pollingInterval"),
        ("  pollingInterval: five\n", "spec.pollingInterval"),
        ("  cooldownPeriod: true\n", "spec.cooldownPeriod"),
        ("  minReplicaCount: 5\n  maxReplicaCount: 3\n", "spec.minReplicaCount"),
        ("  minReplicaCount: 1\n  idleReplicaCount: 1\n", "spec.idleReplicaCount"),
        ("  fallback: {replicas: 2}\n", "spec.fallback.failureThreshold"),
        ("  fallback: {failureThreshold: 1, replicas: 2, behavior: sometimes}\n", "spec.fallback.behavior"),
        (
            "  advanced: {horizontalPodAutoscalerConfig: {behavior: {scaleUp: {policies: [{type: Pods, value: 0, "
            "periodSeconds: 15}]}}}}\n",
            "behavior.scaleUp.policies[0].value",
        ),
        (
            "  advanced: {horizontalPodAutoscalerConfig: {behavior: {scaleDown: {policies: [{type: Ratio, value: 1, "
            "periodSeconds: 15}]}}}}\n",
            "behavior.scaleDown.policies[0].type",
        ),
        (
            "  advanced: {horizontalPodAutoscalerConfig: {behavior: {scaleDown: "
            "{stabilizationWindowSeconds: 7200}}}}\n",
            "behavior.scaleDown.stabilizationWindowSeconds",
        ),
        ("  advanced: {horizontalPodAutoscalerConfig: {behavior: {scaleUp: {policies: []}}}}\n", "scaleUp.policies"),
    ],
)
def test_bad_spec_fields_are_named(extra: str, field: str) -> None:
    with pytest.raises(ValueError) as err:
        loads(_with_spec(extra), "bad.yaml")
    assert str(err.value).startswith("bad.yaml: ") and field in str(err.value)


@pytest.mark.parametrize(
    "old,new,field",
    [
        ("stage: prefill", "stage: prefill, tokensPerSecondPerPod: 800", "metadata.tokensPerSecondPerPod"),
        ("stage: prefill", "other: x", "metadata.stage"),
        ('scalerAddress: "scaler:9090", ', "", "metadata.scalerAddress"),
        ("type: external", "type: external\n      metricType: Utilization", "metricType"),
        ("scaleTargetRef: {name: elastune-prefill}", "scaleTargetRef: {}", "spec.scaleTargetRef.name"),
        ("metadata: {name: so}", "metadata: {}", "metadata.name"),
    ],
)
def test_bad_triggers_and_metadata_are_named(old: str, new: str, field: str) -> None:
    text = MINIMAL.replace(old, new, 1)
    assert text != MINIMAL
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        loads(text, "bad.yaml")


def test_fallback_needs_average_value_triggers() -> None:
    text = _with_spec("  fallback: {failureThreshold: 1, replicas: 2}\n").replace(
        "type: external", "type: external\n      metricType: Value"
    )
    with pytest.raises(ValueError, match=r"spec\.triggers\[0\]\.metricType must be AverageValue"):
        loads(text, "bad.yaml")


def test_triggers_must_agree_on_the_stage() -> None:
    text = MINIMAL + '    - type: external\n      metadata: {scalerAddress: "scaler:9090", stage: decode}\n'
    with pytest.raises(ValueError, match="exactly one elastune stage"):
        loads(text)


def test_broken_yaml_and_non_objects_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("kind: [ScaledObject\n")
    with pytest.raises(ValueError, match="broken.yaml: not valid YAML"):
        load_dir(tmp_path)
    with pytest.raises(ValueError, match="list.yaml: a document is not a Kubernetes object"):
        loads("- a\n- b\n", "list.yaml")
    with pytest.raises(ValueError, match="spec.triggers must be a non-empty list"):
        loads(MINIMAL.split("  triggers:")[0] + "  triggers: []\n", "empty.yaml")
