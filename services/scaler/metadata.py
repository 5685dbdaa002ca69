"""A ScaledObject trigger's `metadata` (KEDA's `scalerMetadata`) parsed into a typed Trigger.

Every value is text, as KEDA passes it. A missing required key or a bad value raises
MetadataError naming the key and what is allowed; the servicer turns it into INVALID_ARGUMENT.

| key                        | default     | allowed                                                  |
| -------------------------- | ----------- | -------------------------------------------------------- |
| `stage`                    | (required)  | prefill, decode, experts, experts/<group>                |
| `group`                    | unset       | with stage experts: the expert group (= experts/<group>) |
| `mode`                     | desired     | desired (replica count), raw (tokens/s; the HPA divides) |
| `tokensPerSecondPerPod`    | 1000        | > 0: what one pod sustains within the SLO (profile it)   |
| `targetUtilization`        | 0.8         | (0, 1]: the share of that capacity to plan for           |
| `emaHalfLifeSeconds`       | 30          | >= 0; 0: no smoothing                                    |
| `sloTtftSeconds`           | unset       | > 0: p95 time to first token above it scales up          |
| `sloItlSeconds`            | unset       | > 0: p95 inter-token latency above it scales up          |
| `queueDrainSeconds`        | 10          | > 0: a backlog must drain this fast (floored at 1 s)     |
| `kvHighWatermark`          | 0.85        | (0, 1]: KV cache use above it scales up                  |
| `minReplicas`              | 1           | integer 0..1000, <= maxReplicas                          |
| `maxReplicas`              | 16          | integer 1..1000                                          |
| `scaleUpCooldownSeconds`   | 15          | >= 0                                                     |
| `scaleDownCooldownSeconds` | 60          | >= 0                                                     |
| `scaleDownWindowSeconds`   | 300         | >= 0: scale down only as far as this window's peak fits  |
| `scaleUpMaxPods`           | 4           | integer 1..1000: one decision adds at most max(this,     |
| `scaleUpMaxPercent`        | 100         | >= 0: ...this percent of the current count) pods         |
| `deadBand`                 | 0.1         | [0, 1): relative need change ignored around the count    |
| `gpuShare`                 | 1           | (0, 1]: the fraction of a GPU each pod has               |
| `decisionIntervalSeconds`  | 5           | > 0: at most one decision per ScaledObject this often    |
| `storePrefix`              | elastune    | letters, digits and _ . : -                              |

`scalerAddress` (KEDA's own) and the TLS keys are ignored; other keys are ignored and logged
once. The defaults of `decisionIntervalSeconds` and `storePrefix` come from ScalerConfig.
`minReplicas`/`maxReplicas` bound the policy's answer; keep them equal to the ScaledObject's
minReplicaCount/maxReplicaCount.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .signals import StagePolicyConfig, StepLimit

MODE_DESIRED = "desired"
MODE_RAW = "raw"
MODES = (MODE_DESIRED, MODE_RAW)
STAGES_ALLOWED = "prefill, decode, experts, experts/<group> (group: lowercase letters, digits, '-')"
KEDA_KEYS = frozenset({"scalerAddress", "caCert", "tlsClientCert", "tlsClientKey", "unsafeSsl", "enableTLS"})
KNOWN_KEYS = frozenset({
    "stage", "group", "mode", "tokensPerSecondPerPod", "targetUtilization", "emaHalfLifeSeconds", "sloTtftSeconds",
    "sloItlSeconds", "queueDrainSeconds", "kvHighWatermark", "minReplicas", "maxReplicas",
    "scaleUpCooldownSeconds", "scaleDownCooldownSeconds", "scaleDownWindowSeconds", "scaleUpMaxPods",
    "scaleUpMaxPercent", "deadBand", "gpuShare",
    "decisionIntervalSeconds", "storePrefix",
})
MAX_REPLICAS_LIMIT = 1000

_GROUP = re.compile(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?")
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

# (what the error message says is allowed, the check)
Rule = tuple[str, Callable[[float], bool]]
POSITIVE: Rule = ("a number > 0", lambda v: v > 0)
NON_NEGATIVE: Rule = ("a number >= 0", lambda v: v >= 0)
FRACTION: Rule = ("a number in (0, 1]", lambda v: 0 < v <= 1)
BAND: Rule = ("a number in [0, 1)", lambda v: 0 <= v < 1)


class MetadataError(ValueError):
    """A missing or bad trigger metadata value; the message names the key and what is allowed."""


@dataclass(frozen=True)
class Trigger:
    """One ScaledObject trigger: which stage, how its metric is reported, and its policy."""

    stage: str
    mode: str
    policy: StagePolicyConfig
    decision_interval_s: float
    store_prefix: str
    unknown_keys: tuple[str, ...] = ()

    @property
    def metric_name(self) -> str:
        """The metric KEDA asks for; "/" is not allowed in metric names, so groups use "-"."""
        kind = "desired-replicas" if self.mode == MODE_DESIRED else "load-tokens-per-second"
        return f"{self.stage.replace('/', '-')}-{kind}"

    @property
    def target(self) -> float:
        """The AverageValue target: one replica per unit (desired), or one pod's usable tokens/s (raw)."""
        if self.mode == MODE_DESIRED:
            return 1.0
        return self.policy.pod_tokens_per_s() * self.policy.target_utilization


def _text(meta: Mapping[str, str], key: str) -> str | None:
    if key not in meta:
        return None
    value = meta[key].strip()
    if not value:
        raise MetadataError(f"scalerMetadata {key} is empty; give a value or leave the key out")
    return value


def _optional(meta: Mapping[str, str], key: str, rule: Rule) -> float | None:
    raw = _text(meta, key)
    if raw is None:
        return None
    allowed, ok = rule
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not ok(value):
        raise MetadataError(f"scalerMetadata {key}={raw!r} is invalid: want {allowed}")
    return value


def _number(meta: Mapping[str, str], key: str, default: float, rule: Rule) -> float:
    value = _optional(meta, key, rule)
    return default if value is None else value


def _integer(meta: Mapping[str, str], key: str, default: int, low: int) -> int:
    raw = _text(meta, key)
    if raw is None:
        return default
    try:
        value: int | None = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= MAX_REPLICAS_LIMIT:
        raise MetadataError(f"scalerMetadata {key}={raw!r} is invalid: want an integer in {low}..{MAX_REPLICAS_LIMIT}")
    return value


def _stage(meta: Mapping[str, str]) -> str:
    raw = _text(meta, "stage")
    if raw is None:
        raise MetadataError(f"scalerMetadata is missing the required key stage: want one of {STAGES_ALLOWED}")
    group = _text(meta, "group")
    if group is not None:  # `stage: experts` + `group: g0` is `stage: experts/g0`
        if raw != "experts":
            raise MetadataError(f"scalerMetadata group={group!r} needs stage experts, got stage={raw!r}")
        if not _GROUP.fullmatch(group):
            raise MetadataError(f"scalerMetadata group={group!r} is invalid: want lowercase letters, digits, '-'")
        return f"experts/{group}"
    if raw in ("prefill", "decode", "experts"):
        return raw
    family, _, group = raw.partition("/")
    if family == "experts" and _GROUP.fullmatch(group):
        return raw
    raise MetadataError(f"scalerMetadata stage={raw!r} is invalid: want one of {STAGES_ALLOWED}")


def _choice(meta: Mapping[str, str], key: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = _text(meta, key)
    if raw is None:
        return default
    if raw not in allowed:
        raise MetadataError(f"scalerMetadata {key}={raw!r} is invalid: want one of {', '.join(allowed)}")
    return raw


def parse_trigger(
    meta: Mapping[str, str], default_interval_s: float = 5.0, default_prefix: str = "elastune"
) -> Trigger:
    """Parse and validate one trigger's metadata; raises MetadataError."""
    stage = _stage(meta)
    mode = _choice(meta, "mode", MODE_DESIRED, MODES)
    min_replicas = _integer(meta, "minReplicas", 1, low=0)
    max_replicas = _integer(meta, "maxReplicas", 16, low=1)
    if min_replicas > max_replicas:
        raise MetadataError(
            f"scalerMetadata minReplicas={min_replicas} exceeds maxReplicas={max_replicas}: "
            "want minReplicas <= maxReplicas"
        )
    prefix = _text(meta, "storePrefix") or default_prefix
    if not _PREFIX.fullmatch(prefix):
        raise MetadataError(
            f"scalerMetadata storePrefix={prefix!r} is invalid: want 1-64 letters, digits or _ . : -"
        )
    policy = StagePolicyConfig(
        stage=stage,
        tokens_per_s_per_pod=_number(meta, "tokensPerSecondPerPod", 1000.0, POSITIVE),
        gpu_share=_number(meta, "gpuShare", 1.0, FRACTION),
        target_utilization=_number(meta, "targetUtilization", 0.8, FRACTION),
        ema_half_life_s=_number(meta, "emaHalfLifeSeconds", 30.0, NON_NEGATIVE),
        slo_ttft_s=_optional(meta, "sloTtftSeconds", POSITIVE),
        slo_itl_s=_optional(meta, "sloItlSeconds", POSITIVE),
        queue_drain_target_s=_number(meta, "queueDrainSeconds", 10.0, POSITIVE),
        kv_high_watermark=_number(meta, "kvHighWatermark", 0.85, FRACTION),
        scale_up_cooldown_s=_number(meta, "scaleUpCooldownSeconds", 15.0, NON_NEGATIVE),
        scale_down_cooldown_s=_number(meta, "scaleDownCooldownSeconds", 60.0, NON_NEGATIVE),
        scale_down_window_s=_number(meta, "scaleDownWindowSeconds", 300.0, NON_NEGATIVE),
        scale_up_max_step=StepLimit(_integer(meta, "scaleUpMaxPods", 4, low=1),
                                    _number(meta, "scaleUpMaxPercent", 100.0, NON_NEGATIVE)),
        dead_band=_number(meta, "deadBand", 0.1, BAND),
        min_replicas=min_replicas,
        max_replicas=max_replicas,
    )
    return Trigger(
        stage=stage,
        mode=mode,
        policy=policy,
        decision_interval_s=_number(meta, "decisionIntervalSeconds", default_interval_s, POSITIVE),
        store_prefix=prefix,
        unknown_keys=tuple(sorted(k for k in meta if k not in KNOWN_KEYS and k not in KEDA_KEYS)),
    )
