"""Service-time models of one model on one device kind, fitted from profiles. Pure.

Profile JSON (one object; times in ms, shares in (0, 1]):

    {
      "name": "tiny-cpu",                 # what the profile is of
      "source": "measured: ...",          # how it was obtained (measured, or derived and from what)
      "device": "cpu" | "H100" | ...,
      "prefill": {
        "overhead_ms", "ms_per_token", "ms_per_token_sq", "ms_per_seq",
        "max_batch_tokens", "max_batch_size"          # the default micro-batch limits
      },
      "decode": {
        "combine": "sum" | "max",          # how the memory and compute terms of a step combine
        "overhead_ms", "weight_ms", "kv_ms_per_token", "compute_ms_per_seq",
        "bandwidth_by_share": [[share, fraction of full memory bandwidth], ...],
        "max_batch_size", "kv_capacity_tokens",       # per pod at share 1
        "shared_bandwidth": true            # co-located pods split bandwidth: fraction = min(curve, share)
      },
      "kv_transfer_ms_per_token": float,  # prefill -> decode KV hand-off
      "cold_start_s": {"prefill": s, "decode": s, "experts": s},    # scheduled -> serving
      "experts": {                        # optional (MoE models): one expert group's FFNs, per MoE layer call
        "source",                         # measured (elastune profile --stages experts) or derived
        "overhead_ms", "piece_ms", "ms_per_pair",
        "layers",                         # MoE layers: a decode step or a prefill makes one call per layer
        "max_batch_size"                  # the default expert micro-batch, in routed (token, expert) pairs
      },
      "stack": {                          # optional: what the serving stack adds on its host (all default 0)
        "request_overhead_ms",            # per request, on the way to its first token, beyond the model's
                                          # prefill and the KV hand-off: gateway, gRPC hops, admission
        "step_overhead_ms",               # per decode step beyond the model's step: the serving loop
        "host_cores",                     # > 0: every pod runs on ONE host of this many cores (a local
                                          # stack); 0: each pod has its own device share (a cluster)
        "background_cores",               # CPU the host's other processes burn with no requests
        "cpu_ms_per_request", "cpu_ms_per_token",     # CPU they burn per request and per output token
        "starting_cpu"                    # cores a cold-starting pod burns (imports, model load)
      }
    }

Prefill of a micro-batch of prompts t_1..t_n at share s (compute-bound, slows in proportion):
    overhead + (ms_per_token * sum(t) + ms_per_token_sq * sum(t^2) + ms_per_seq * n) / s
Decode step of B sequences holding C context tokens in all, at share s (a roofline):
    memory = (weight_ms + kv_ms_per_token * C) / bandwidth(s); compute = compute_ms_per_seq * B / s
    bandwidth(s) is the measured single-pod curve; with shared_bandwidth (the default, and what MPS
    gives) it is capped at s, since the pods packed beside it use the rest of the memory bandwidth.
    step = overhead + (memory + compute  if combine == "sum"  else  max(memory, compute))
KV capacity and the batch limit scale with the share (MIG-like partitioning of memory).
An expert group's call of P routed pairs at share s, cut into micro-batches of m pairs
(services/experts/micro_batch.py: every piece pays each expert's pass again):
    overhead + (ceil(P / m) * piece_ms + ms_per_pair * P) / s
Without an experts block the model is derived from the decode model (ExpertsModel.derived).

Host sharing (stack.host_cores > 0: the local stack, where gateway, workers and load client share
a few cores): the host is processor-shared. Its CPU demand is the shares of the pods busy at that
moment, starting_cpu for each pod cold-starting on the host, and the background (idle cores +
per-request and per-token CPU at the current rates); beyond host_cores every busy process slows
by demand / host_cores (a cold start itself is not stretched). The simulator applies the
slowdown when a prefill micro-batch starts and when a decode pod's step time is set (at each of
its events): a batch keeps the speed it started with. A profile without a stack block (the H100
one) has no overheads and no sharing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _interp(points: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise-linear through sorted (x, y) points, flat outside them."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


@dataclass(frozen=True)
class PrefillModel:
    overhead_ms: float
    ms_per_token: float
    ms_per_token_sq: float = 0.0
    ms_per_seq: float = 0.0
    max_batch_tokens: int = 4096
    max_batch_size: int = 16

    def batch_ms(self, tokens: int, tokens_sq: float, seqs: int, share: float) -> float:
        work = self.ms_per_token * tokens + self.ms_per_token_sq * tokens_sq + self.ms_per_seq * seqs
        return self.overhead_ms + work / share


@dataclass(frozen=True)
class DecodeModel:
    weight_ms: float
    kv_ms_per_token: float
    compute_ms_per_seq: float
    overhead_ms: float = 0.0
    combine: str = "max"
    bandwidth_by_share: tuple[tuple[float, float], ...] = ((0.0, 0.0), (1.0, 1.0))
    max_batch_size: int = 64
    kv_capacity_tokens: int = 131072
    shared_bandwidth: bool = True

    def __post_init__(self) -> None:
        if self.combine not in ("sum", "max"):
            raise ValueError(f"decode.combine must be sum or max, got {self.combine!r}")

    def bandwidth(self, share: float) -> float:
        fraction = _interp(self.bandwidth_by_share, share)
        if self.shared_bandwidth:  # pods packed on one GPU split its memory bandwidth (MPS does not partition it)
            fraction = min(fraction, share)
        return max(fraction, 1e-3)

    def step_ms(self, batch: int, context_tokens: float, share: float) -> float:
        return self.stepper(share)(batch, context_tokens)

    def stepper(self, share: float):
        """step_ms at a fixed share, with the share's factors worked out once (the simulator's hot path)."""
        per_mem, per_seq = 1.0 / self.bandwidth(share), self.compute_ms_per_seq / share
        weight, per_kv, overhead = self.weight_ms * per_mem, self.kv_ms_per_token * per_mem, self.overhead_ms
        if self.combine == "sum":
            return lambda batch, context: overhead + weight + per_kv * context + per_seq * batch
        return lambda batch, context: overhead + max(weight + per_kv * context, per_seq * batch)

    def kv_capacity(self, share: float) -> int:
        return int(self.kv_capacity_tokens * share)


@dataclass(frozen=True)
class ExpertsModel:
    """One expert group's answer to one MoE-layer call (see the module docstring)."""

    piece_ms: float
    ms_per_pair: float
    overhead_ms: float = 0.0
    layers: int = 1
    max_batch_size: int = 256
    source: str = ""

    def __post_init__(self) -> None:
        if self.piece_ms < 0 or self.ms_per_pair < 0 or self.overhead_ms < 0:
            raise ValueError("experts piece_ms, ms_per_pair and overhead_ms must be >= 0")
        if self.layers < 1 or self.max_batch_size < 1:
            raise ValueError(f"experts.layers and experts.max_batch_size must be >= 1, got {self.layers}, "
                             f"{self.max_batch_size}")

    def call_ms(self, pairs: float, share: float, micro_batch: int) -> float:
        """Device time of one call of `pairs` routed pairs (0 for none: no call is made)."""
        if pairs <= 0:
            return 0.0
        return self.overhead_ms + (math.ceil(pairs / micro_batch) * self.piece_ms + self.ms_per_pair * pairs) / share

    @classmethod
    def derived(cls, decode: "DecodeModel") -> "ExpertsModel":
        """A default for a profile without measured experts rows: one call stands for every MoE
        layer of a step (layers 1); a piece reads the group's expert weights, taken as half of
        the dense step's weight read, and a routed pair costs what one sequence adds to a step."""
        return cls(piece_ms=decode.weight_ms / 2, ms_per_pair=decode.compute_ms_per_seq, layers=1,
                   source="derived from the decode model (weight_ms / 2 per piece, compute_ms_per_seq per pair)")


@dataclass(frozen=True)
class StackModel:
    """What the serving stack adds around the model on its host (see the module docstring)."""

    request_overhead_ms: float = 0.0
    step_overhead_ms: float = 0.0
    host_cores: float = 0.0
    background_cores: float = 0.0
    cpu_ms_per_request: float = 0.0
    cpu_ms_per_token: float = 0.0
    starting_cpu: float = 0.0

    def __post_init__(self) -> None:
        for name in ("request_overhead_ms", "step_overhead_ms", "host_cores", "background_cores",
                     "cpu_ms_per_request", "cpu_ms_per_token", "starting_cpu"):
            if getattr(self, name) < 0:
                raise ValueError(f"stack.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def shared_host(self) -> bool:
        return self.host_cores > 0

    def background(self, requests_per_s: float, tokens_per_s: float) -> float:
        """Cores the non-worker processes use at these rates."""
        return self.background_cores + (requests_per_s * self.cpu_ms_per_request
                                        + tokens_per_s * self.cpu_ms_per_token) / 1000.0

    def slowdown(self, busy_share: float, background_cores: float) -> float:
        """How much longer CPU work takes when pods of `busy_share` in all and the background
        compete for the host (processor sharing); 1 without a shared host."""
        if self.host_cores <= 0:
            return 1.0
        return max(1.0, (busy_share + background_cores) / self.host_cores)


@dataclass(frozen=True)
class Profile:
    name: str
    source: str
    device: str
    prefill: PrefillModel
    decode: DecodeModel
    kv_transfer_ms_per_token: float = 0.0
    cold_start_s: dict[str, float] = field(default_factory=lambda: {"prefill": 30.0, "decode": 30.0})
    stack: StackModel = field(default_factory=StackModel)
    experts: ExpertsModel | None = None  # MoE: measured; None: derived when a run routes to experts

    def experts_model(self) -> ExpertsModel:
        return self.experts if self.experts is not None else ExpertsModel.derived(self.decode)

    def cold_start(self, stage: str) -> float:
        return float(self.cold_start_s.get(stage, 0.0))


def profile_from_dict(data: dict[str, Any]) -> Profile:
    """A Profile from its JSON object; unknown keys (samples, fit, machine) are kept out."""
    try:
        pre, dec = data["prefill"], data["decode"]
        prefill = PrefillModel(
            overhead_ms=float(pre["overhead_ms"]), ms_per_token=float(pre["ms_per_token"]),
            ms_per_token_sq=float(pre.get("ms_per_token_sq", 0.0)), ms_per_seq=float(pre.get("ms_per_seq", 0.0)),
            max_batch_tokens=int(pre.get("max_batch_tokens", 4096)), max_batch_size=int(pre.get("max_batch_size", 16)),
        )
        decode = DecodeModel(
            weight_ms=float(dec["weight_ms"]), kv_ms_per_token=float(dec["kv_ms_per_token"]),
            compute_ms_per_seq=float(dec["compute_ms_per_seq"]), overhead_ms=float(dec.get("overhead_ms", 0.0)),
            combine=str(dec.get("combine", "max")),
            bandwidth_by_share=tuple((float(s), float(b)) for s, b in dec.get("bandwidth_by_share", [[0, 0], [1, 1]])),
            max_batch_size=int(dec.get("max_batch_size", 64)),
            kv_capacity_tokens=int(dec.get("kv_capacity_tokens", 131072)),
            shared_bandwidth=bool(dec.get("shared_bandwidth", True)),
        )
        return Profile(
            name=str(data["name"]), source=str(data.get("source", "")), device=str(data.get("device", "")),
            prefill=prefill, decode=decode,
            kv_transfer_ms_per_token=float(data.get("kv_transfer_ms_per_token", 0.0)),
            cold_start_s={str(k): float(v) for k, v in data.get("cold_start_s", {}).items()},
            stack=_stack(data.get("stack", {})),
            experts=_experts(data["experts"]) if "experts" in data else None,
        )
    except KeyError as exc:
        raise ValueError(f"profile {data.get('name', '?')!r} lacks {exc.args[0]!r}") from exc


def _stack(data: dict[str, Any]) -> StackModel:
    """The stack block: the named numbers only (its source and raw measurements stay in the JSON)."""
    names = ("request_overhead_ms", "step_overhead_ms", "host_cores", "background_cores",
             "cpu_ms_per_request", "cpu_ms_per_token", "starting_cpu")
    return StackModel(**{name: float(data[name]) for name in names if name in data})


def _experts(data: dict[str, Any]) -> ExpertsModel:
    return ExpertsModel(piece_ms=float(data["piece_ms"]), ms_per_pair=float(data["ms_per_pair"]),
                        overhead_ms=float(data.get("overhead_ms", 0.0)), layers=int(data.get("layers", 1)),
                        max_batch_size=int(data.get("max_batch_size", 256)), source=str(data.get("source", "")))


def load_profile(path: str | Path) -> Profile:
    return profile_from_dict(json.loads(Path(path).read_text()))
