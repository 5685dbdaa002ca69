"""KEDA ScaledObject manifests as typed objects: the YAML KEDA reads on a cluster drives the local autoscaler.

Defaults are KEDA's (pollingInterval 30, cooldownPeriod 300, minReplicaCount 0, maxReplicaCount 100,
metricType AverageValue) and Kubernetes' (per-field `spec.behavior` defaults). A ScaledObject without
`advanced.horizontalPodAutoscalerConfig.behavior` gets `behavior=None`: the HPA's legacy path.
Bad input raises ValueError naming the file and the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.autoscaler.hpa import (
    DEFAULT_SCALE_DOWN,
    DEFAULT_SCALE_UP,
    DEFAULT_TOLERANCE,
    HPABehavior,
    HPAScalingPolicy,
    HPAScalingRules,
    KedaScaledObjectState,
)

API_GROUP = "keda.sh/"
KIND = "ScaledObject"
EXTERNAL_TRIGGERS = ("external", "external-push")
METRIC_TYPES = ("AverageValue", "Value", "Utilization")
FALLBACK_BEHAVIORS = ("static", "currentReplicas", "currentReplicasIfHigher", "currentReplicasIfLower")
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Trigger:
    """One `spec.triggers[]` entry; `metadata` goes to the scaler as ScaledObjectRef.scalerMetadata."""

    type: str
    metadata: Mapping[str, str]
    metric_type: str = "AverageValue"
    name: str = ""

    @property
    def push(self) -> bool:
        return self.type == "external-push"

    @property
    def scaler_address(self) -> str:
        return self.metadata.get("scalerAddress", "")


@dataclass(frozen=True)
class Fallback:
    """Replicas to ask for once a metric has failed more than `failure_threshold` times in a row."""

    failure_threshold: int
    replicas: int
    behavior: str = "static"


@dataclass(frozen=True)
class ScaledObject:
    name: str
    namespace: str
    target: str  # spec.scaleTargetRef.name
    stage: str  # the elastune stage its triggers name (metadata `stage`)
    triggers: tuple[Trigger, ...]
    polling_interval_s: int = 30
    cooldown_period_s: int = 300
    min_replica_count: int = 0
    max_replica_count: int = 100
    idle_replica_count: int | None = None
    behavior: HPABehavior | None = None
    tolerance: float = DEFAULT_TOLERANCE  # behavior.scaleUp/scaleDown.tolerance (equal both ways here)
    fallback: Fallback | None = None
    source: str = ""  # the file it came from, for messages

    def state(self) -> KedaScaledObjectState:
        """A fresh KEDA executor + HPA for this object."""
        return KedaScaledObjectState(
            min_replica_count=self.min_replica_count,
            max_replica_count=self.max_replica_count,
            idle_replica_count=self.idle_replica_count,
            cooldown_period_s=float(self.cooldown_period_s),
            polling_interval_s=float(self.polling_interval_s),
            behavior=self.behavior,
            tolerance=self.tolerance,
        )


def scaler_addresses(objects: Iterable[ScaledObject]) -> set[str]:
    """Every scalerAddress the objects' triggers dial (the keys of a local address override)."""
    return {t.scaler_address for so in objects for t in so.triggers if t.scaler_address}


def load_dir(path: str | Path) -> list[ScaledObject]:
    """Every ScaledObject in the directory's *.yaml / *.yml files; other kinds are skipped."""
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    return [so for f in files for so in load_file(f)]


def load_file(path: str | Path) -> list[ScaledObject]:
    """The ScaledObjects of one (possibly multi-document) YAML file."""
    return loads(Path(path).read_text(), str(path))


def loads(text: str, source: str = "<string>") -> list[ScaledObject]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML: {exc}") from exc
    found = []
    for doc in docs:
        if not isinstance(doc, Mapping):
            raise ValueError(f"{source}: a document is not a Kubernetes object (a mapping)")
        if doc.get("kind") == KIND and str(doc.get("apiVersion", "")).startswith(API_GROUP):
            found.append(parse(doc, source))
    return found


def parse(doc: Mapping[str, Any], source: str = "<string>") -> ScaledObject:
    """One ScaledObject document (already loaded from YAML)."""
    f = _Fields(source)
    if doc.get("kind") != KIND:
        raise f.error("kind", f"must be {KIND}, got {doc.get('kind')!r}")
    meta = f.mapping(doc.get("metadata"), "metadata")
    spec = f.mapping(doc.get("spec"), "spec")
    target = f.mapping(spec.get("scaleTargetRef"), "spec.scaleTargetRef")
    raw_triggers = spec.get("triggers")
    if not isinstance(raw_triggers, list) or not raw_triggers:
        raise f.error("spec.triggers", "must be a non-empty list")
    triggers = tuple(_trigger(f, t, f"spec.triggers[{i}]") for i, t in enumerate(raw_triggers))
    min_count = f.integer(spec, "minReplicaCount", "spec", 0)
    max_count = f.integer(spec, "maxReplicaCount", "spec", 100, minimum=1)
    if min_count > max_count:
        raise f.error("spec.minReplicaCount", f"({min_count}) must be <= maxReplicaCount ({max_count})")
    idle = f.optional_integer(spec, "idleReplicaCount", "spec")
    if idle is not None and idle >= min_count:
        raise f.error("spec.idleReplicaCount", f"({idle}) must be lower than minReplicaCount ({min_count})")
    fallback = _fallback(f, spec.get("fallback"), triggers)
    advanced = f.mapping(spec.get("advanced", {}), "spec.advanced")
    hpa_path = "spec.advanced.horizontalPodAutoscalerConfig"
    hpa_config = f.mapping(advanced.get("horizontalPodAutoscalerConfig", {}), hpa_path)
    behavior = hpa_config.get("behavior")
    return ScaledObject(
        name=f.string(meta, "name", "metadata"),
        namespace=f.string(meta, "namespace", "metadata", "default"),
        target=f.string(target, "name", "spec.scaleTargetRef"),
        stage=_stage(f, triggers),
        triggers=triggers,
        polling_interval_s=f.integer(spec, "pollingInterval", "spec", 30, minimum=1),
        cooldown_period_s=f.integer(spec, "cooldownPeriod", "spec", 300),
        min_replica_count=min_count,
        max_replica_count=max_count,
        idle_replica_count=idle,
        behavior=_behavior(f, behavior, f"{hpa_path}.behavior"),
        tolerance=_tolerance(f, behavior, f"{hpa_path}.behavior"),
        fallback=fallback,
        source=source,
    )


class _Fields:
    """Typed field access whose errors name the file and the field's path."""

    def __init__(self, source: str):
        self.source = source

    def error(self, path: str, problem: str) -> ValueError:
        return ValueError(f"{self.source}: {path} {problem}")

    def mapping(self, node: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(node, Mapping):
            raise self.error(path, f"must be a mapping, got {node!r}")
        return node

    def string(self, node: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str:
        value = node.get(key, default)
        if not isinstance(value, str) or not value:
            raise self.error(f"{path}.{key}", f"must be a non-empty string, got {value!r}")
        return value

    def integer(self, node: Mapping[str, Any], key: str, path: str, default: int | None,
                minimum: int = 0, maximum: int = _INT32_MAX) -> int:
        """`node[key]` (or `default`; None: the field is required) within [minimum, maximum]."""
        value = node.get(key, default)
        if value is None:
            raise self.error(f"{path}.{key}", "is required")
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise self.error(f"{path}.{key}", f"must be an integer in [{minimum}, {maximum}], got {value!r}")
        return value

    def optional_integer(self, node: Mapping[str, Any], key: str, path: str) -> int | None:
        return None if node.get(key) is None else self.integer(node, key, path, None)


def _trigger(f: _Fields, node: Any, path: str) -> Trigger:
    node = f.mapping(node, path)
    metadata = f.mapping(node.get("metadata"), f"{path}.metadata")
    for key, value in metadata.items():
        if not isinstance(value, str):  # the CRD: additionalProperties type string
            raise f.error(f"{path}.metadata.{key}", f"must be a string (quote it in YAML), got {value!r}")
    trigger = Trigger(
        type=f.string(node, "type", path),
        metadata=dict(metadata),
        metric_type=f.string(node, "metricType", path, "AverageValue"),
        name=str(node.get("name", "")),
    )
    if trigger.metric_type not in METRIC_TYPES:
        raise f.error(f"{path}.metricType", f"must be one of {METRIC_TYPES}, got {trigger.metric_type!r}")
    if trigger.type in EXTERNAL_TRIGGERS:
        if trigger.metric_type == "Utilization":
            raise f.error(f"{path}.metricType", "Utilization is only for cpu and memory triggers")
        f.string(metadata, "scalerAddress", f"{path}.metadata")
    return trigger


def _stage(f: _Fields, triggers: tuple[Trigger, ...]) -> str:
    # `stage: experts` with `group: g0` is the expert group's stage experts/g0 (services/scaler/metadata.py)
    stages = {t.metadata["stage"] + (f"/{t.metadata['group']}" if "group" in t.metadata else "")
              for t in triggers if "stage" in t.metadata}
    if len(stages) != 1:
        raise f.error("spec.triggers[].metadata.stage", f"must name exactly one elastune stage, got {sorted(stages)}")
    return stages.pop()


def _fallback(f: _Fields, node: Any, triggers: tuple[Trigger, ...]) -> Fallback | None:
    if node is None:
        return None
    node = f.mapping(node, "spec.fallback")
    behavior = f.string(node, "behavior", "spec.fallback", "static")
    if behavior not in FALLBACK_BEHAVIORS:
        raise f.error("spec.fallback.behavior", f"must be one of {FALLBACK_BEHAVIORS}, got {behavior!r}")
    for i, trigger in enumerate(triggers):  # KEDA's admission check (CheckFallbackValid)
        if trigger.metric_type != "AverageValue":
            raise f.error(f"spec.triggers[{i}].metricType", "must be AverageValue when spec.fallback is set")
    return Fallback(
        failure_threshold=f.integer(node, "failureThreshold", "spec.fallback", None),
        replicas=f.integer(node, "replicas", "spec.fallback", None),
        behavior=behavior,
    )


def _behavior(f: _Fields, node: Any, path: str) -> HPABehavior | None:
    if node is None:
        return None
    node = f.mapping(node, path)
    return HPABehavior(
        scale_up=_rules(f, node.get("scaleUp"), f"{path}.scaleUp", DEFAULT_SCALE_UP),
        scale_down=_rules(f, node.get("scaleDown"), f"{path}.scaleDown", DEFAULT_SCALE_DOWN),
    )


def _tolerance(f: _Fields, node: Any, path: str) -> float:
    """scaleUp/scaleDown.tolerance (a quantity: 0, "0.05", "50m"); absent: the cluster-wide 0.1."""
    found: set[float] = set()
    for direction in ("scaleUp", "scaleDown"):
        raw = ((node or {}).get(direction) or {}).get("tolerance", DEFAULT_TOLERANCE)
        text = str(raw)
        try:
            value = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
        except ValueError:
            value = -1.0
        if isinstance(raw, bool) or not value >= 0:
            raise f.error(f"{path}.{direction}.tolerance", f"must be a quantity >= 0 (0.05 or 50m), got {raw!r}")
        found.add(value)
    if len(found) != 1:
        raise f.error(f"{path}.scaleUp.tolerance", f"must equal scaleDown's (one HPA tolerance), got {sorted(found)}")
    return found.pop()


def _rules(f: _Fields, node: Any, path: str, default: HPAScalingRules) -> HPAScalingRules:
    """Kubernetes fills each absent field of a direction from that direction's defaults."""
    if node is None:
        return default
    node = f.mapping(node, path)
    window = f.integer(node, "stabilizationWindowSeconds", path, default.stabilization_window_s, maximum=3600)
    select = f.string(node, "selectPolicy", path, default.select_policy)
    if select not in ("Max", "Min", "Disabled"):
        raise f.error(f"{path}.selectPolicy", f"must be Max, Min or Disabled, got {select!r}")
    policies = default.policies
    if "policies" in node:
        raw = node["policies"]
        if not isinstance(raw, list) or not raw:
            raise f.error(f"{path}.policies", "must be a non-empty list")
        policies = tuple(_policy(f, p, f"{path}.policies[{i}]") for i, p in enumerate(raw))
    return HPAScalingRules(window, select, policies)


def _policy(f: _Fields, node: Any, path: str) -> HPAScalingPolicy:
    node = f.mapping(node, path)
    kind = f.string(node, "type", path)
    if kind not in ("Pods", "Percent"):
        raise f.error(f"{path}.type", f"must be Pods or Percent, got {kind!r}")
    value = f.integer(node, "value", path, None, minimum=1)
    period = f.integer(node, "periodSeconds", path, None, minimum=1, maximum=1800)
    return HPAScalingPolicy(kind, value, period)
