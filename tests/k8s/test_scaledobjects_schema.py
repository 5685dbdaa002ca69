"""The ScaledObject manifests validate against KEDA's CRD schema, as a cluster's API server would check them."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (pip install jsonschema)")

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = {stage: REPO / f"k8s/base/scaledobject-{stage}.yaml" for stage in ("prefill", "decode")}
LOCAL = {stage: REPO / f"k8s/local/scaledobject-{stage}.yaml" for stage in ("prefill", "decode")}
INT32 = (-(2**31), 2**31 - 1)


def _shared_dir() -> Path:
    return Path(os.environ.get("ELASTUNE_SHARED") or REPO.parent / "shared")


@pytest.fixture(scope="module")
def validator() -> Any:
    path = _shared_dir() / "schemas" / "keda.sh_scaledobjects.yaml"
    if not path.is_file():
        pytest.skip(f"KEDA's ScaledObject CRD not found at {path}; set ELASTUNE_SHARED to the shared folder")
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    formats = jsonschema.FormatChecker()
    formats.checks("int32")(lambda v: not isinstance(v, int) or INT32[0] <= v <= INT32[1])
    return jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"], format_checker=formats)


def _load(stage: str) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all(MANIFESTS[stage].read_text()) if d is not None]
    return doc


def _problems(validator: Any, doc: dict[str, Any]) -> list[str]:
    found = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    spec = doc.get("spec", {})
    # The CRD's x-kubernetes-validations rule (CEL), which JSON Schema cannot express.
    if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
        found.append("minReplicaCount must be less than or equal to maxReplicaCount")
    return found


@pytest.mark.parametrize("stage", sorted(MANIFESTS))
def test_manifest_is_a_valid_scaled_object(validator, stage: str) -> None:
    doc = _load(stage)
    assert doc["apiVersion"] == "keda.sh/v1alpha1" and doc["kind"] == "ScaledObject"
    assert _problems(validator, doc) == []


@pytest.mark.parametrize("stage", sorted(MANIFESTS))
def test_manifest_scales_its_deployment_through_the_elastune_scaler(stage: str) -> None:
    spec = _load(stage)["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"elastune-{stage}"}
    assert spec["minReplicaCount"] == 1 <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == ("external-push" if stage == "decode" else "external")
    meta = trigger["metadata"]
    assert meta["stage"] == stage and meta["mode"] == "desired"
    assert float(meta["tokensPerSecondPerPod"]) > 0
    # The scaler's own bounds agree with KEDA's, or one of them would clamp the other.
    assert (int(meta["minReplicas"]), int(meta["maxReplicas"])) == (spec["minReplicaCount"], spec["maxReplicaCount"])
    assert spec["fallback"]["replicas"] <= spec["maxReplicaCount"]


def test_both_stages_dial_the_same_scaler_address() -> None:
    addresses = {s: _load(s)["spec"]["triggers"][0]["metadata"]["scalerAddress"] for s in MANIFESTS}
    assert len(set(addresses.values())) == 1, addresses
    host, port = addresses["prefill"].rsplit(":", 1)
    assert host == "elastune-scaler.elastune.svc" and port.isdigit()


@pytest.mark.parametrize("stage", sorted(MANIFESTS))
def test_behavior_is_explicit_fast_up_slow_down(stage: str) -> None:
    behavior = _load(stage)["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    up, down = behavior["scaleUp"], behavior["scaleDown"]
    assert up["stabilizationWindowSeconds"] == 0
    assert {(p["type"], p["value"], p["periodSeconds"]) for p in up["policies"]} == {
        ("Percent", 100, 15),
        ("Pods", 4, 15),
    }
    assert down["stabilizationWindowSeconds"] >= 60
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 60}]


@pytest.mark.parametrize(
    "path,value,needle",
    [
        (("spec", "triggers", 0, "metadata", "maxReplicas"), 8, "is not of type 'string'"),
        (("spec", "minReplicaCount"), -1, "less than the minimum"),
        (("spec", "pollingInterval"), 0, "less than the minimum"),
        (("spec", "fallback", "behavior"), "sometimes", "is not one of"),
        (("spec", "maxReplicaCount"), 2**31, "int32"),
        (("spec", "minReplicaCount"), 9, "less than or equal to maxReplicaCount"),
    ],
)
def test_the_schema_check_rejects_broken_manifests(validator, path: tuple, value: Any, needle: str) -> None:
    doc = copy.deepcopy(_load("prefill"))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    problems = _problems(validator, doc)
    assert any(needle in p for p in problems), problems


def test_the_schema_check_requires_triggers(validator) -> None:
    doc = _load("decode")
    del doc["spec"]["triggers"]
    assert any("'triggers' is a required property" in p for p in _problems(validator, doc))


@pytest.mark.parametrize("stage", sorted(LOCAL))
def test_local_stack_scaled_objects_differ_from_the_cluster_only_in_numbers(validator, stage: str) -> None:
    (local,) = [d for d in yaml.safe_load_all(LOCAL[stage].read_text()) if d is not None]
    assert _problems(validator, local) == []
    base = _load(stage)
    assert local["spec"]["scaleTargetRef"] == base["spec"]["scaleTargetRef"]
    (lt,), (bt,) = local["spec"]["triggers"], base["spec"]["triggers"]
    assert (lt["type"], lt["metadata"]["stage"], lt["metadata"]["scalerAddress"]) == (
        bt["type"], bt["metadata"]["stage"], bt["metadata"]["scalerAddress"])
    assert local["spec"]["pollingInterval"] <= base["spec"]["pollingInterval"]


EXPERTS = REPO / "k8s/base/scaledobject-experts-g0.yaml"


def test_experts_group_scaled_object_is_valid_and_idles_at_zero(validator) -> None:
    (doc,) = [d for d in yaml.safe_load_all(EXPERTS.read_text()) if d is not None]
    assert _problems(validator, doc) == []
    spec = doc["spec"]
    (trigger,) = spec["triggers"]
    meta = trigger["metadata"]
    assert (meta["stage"], meta["group"]) == ("experts", "g0")
    assert meta["scalerAddress"] == _load("prefill")["spec"]["triggers"][0]["metadata"]["scalerAddress"]
    assert (int(meta["minReplicas"]), int(meta["maxReplicas"])) == (spec["minReplicaCount"], spec["maxReplicaCount"])
    assert spec["minReplicaCount"] == 0 and spec["fallback"]["replicas"] <= spec["maxReplicaCount"]


@pytest.mark.parametrize("path", sorted((REPO / "k8s").rglob("scaledobject-*.yaml")), ids=lambda p: p.name)
def test_the_elastune_scaler_accepts_every_trigger_it_is_sent(path: Path) -> None:
    """What KEDA passes as scalerMetadata is parsed by the scaler itself, so a typo fails here, not in a cluster."""
    from services.scaler.metadata import parse_trigger

    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for trigger in doc["spec"]["triggers"]:
        parsed = parse_trigger(trigger["metadata"])
        assert parsed.stage.split("/")[0] == trigger["metadata"]["stage"]
        assert set(parsed.unknown_keys) <= {"group"}  # group: the experts stage's (services/scaler, MoE issue)
