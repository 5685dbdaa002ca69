"""k8s/local-experts: the ScaledObjects `elastune up --model tiny-moe --autoscale` applies, one per
expert group, valid against KEDA's CRD (the helper of tests/k8s) and naming their groups."""

from __future__ import annotations

import yaml

from services.autoscaler.scaledobject import load_dir
from services.scaler.metadata import parse_trigger
from tests.k8s.test_manifests import K8S, _keda_validator


def test_local_expert_scaled_objects_name_their_groups_and_validate():
    objects = load_dir(K8S / "local-experts")
    assert sorted(so.stage for so in objects) == ["experts/g0", "experts/g1"]
    validator = _keda_validator()
    for path in sorted((K8S / "local-experts").glob("*.yaml")):
        (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert [e.message for e in validator.iter_errors(doc)] == []
        (trigger,) = doc["spec"]["triggers"]
        group = doc["metadata"]["name"].rsplit("-", 1)[1]
        assert parse_trigger(trigger["metadata"]).stage == f"experts/{group}"
