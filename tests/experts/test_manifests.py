"""k8s/overlays/moe: the experts stage on a cluster. Renders with kubectl kustomize; core objects
validate against the Kubernetes API, ScaledObjects against KEDA's CRD (helpers of tests/k8s)."""

from __future__ import annotations

import pytest

from services.autoscaler.scaledobject import load_dir
from services.scaler.metadata import parse_trigger
from tests.k8s.test_manifests import CORE_KINDS, K8S, K8S_VERSION, _keda_validator, _named, _of_kind, _render


def test_moe_overlay_runs_one_experts_deployment_and_scaled_object_per_group():
    docs = _render("moe")
    config = _named(docs, "ConfigMap", "elastune-config")["data"]
    assert config["ELASTUNE_MODEL_DIR"] == "/models/tiny-moe" and config["ELASTUNE_EXPERTS"] == "remote"
    validator = _keda_validator()
    for group in ("g0", "g1"):
        deployment = _named(docs, "Deployment", f"elastune-experts-{group}")
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert container["args"] == ["serve", "experts"] and env["ELASTUNE_GROUP"] == group
        assert env["ELASTUNE_EXPERTS"] == "local"  # the servers compute; only workers call out
        sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        assert sleep + float(env["ELASTUNE_DRAIN_GRACE_S"]) < pod["terminationGracePeriodSeconds"]
        port = int(env["ELASTUNE_PORT"])
        assert container["readinessProbe"]["grpc"]["port"] == port == container["ports"][0]["containerPort"]
        (so,) = [d for d in _of_kind(docs, "ScaledObject") if d["spec"]["scaleTargetRef"]["name"] == f"elastune-experts-{group}"]
        assert [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(so)] == []
        (trigger,) = so["spec"]["triggers"]
        assert parse_trigger(trigger["metadata"]).stage == f"experts/{group}"
    # every Deployment that loads the model creates the MoE one
    for name in ("elastune-gateway", "elastune-prefill", "elastune-decode"):
        (init,) = _named(docs, "Deployment", name)["spec"]["template"]["spec"]["initContainers"]
        assert "tiny-moe" in init["command"][-1]


def test_moe_overlay_core_objects_validate_against_the_kubernetes_api():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for doc in _render("moe"):
        if doc["kind"] in CORE_KINDS:
            kv.validate(doc, K8S_VERSION, strict=True)


def test_local_expert_scaled_objects_name_their_groups():
    objects = load_dir(K8S / "local-experts")
    assert sorted(so.stage for so in objects) == ["experts/g0", "experts/g1"]
