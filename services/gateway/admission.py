"""Admission control: admit a request only if the fleet can hold it and serve it in time (pure).

Two questions, answered from the workers' load reports (about a second old) and the
gateway's own count of requests it has sent that wait for a first token:

1. KV headroom: does some decode worker have room for the request's prompt + max_tokens,
   after the prompts already waiting on it and a reserve for running sequences to grow?
   If no worker could hold it even when empty, retrying cannot help: that is bad input
   (HTTP 400), not overload.
2. Deadline feasibility: prompt tokens queued ahead (plus this prompt) divided by the
   prefill fleet's measured throughput estimates the wait for a first token. If that is
   longer than the TTFT SLO or the request's own deadline, the request would miss it
   anyway: reject now, while the client can still go elsewhere, instead of after the wait.
   Throughput is only trusted from workers that have a backlog, because an idle worker's
   token rate says how much work arrived, not how much it can do.

Unknowns admit: no reports, no capacity reported, no throughput measured yet. The decode
worker's bounded wait queue stays the last line of defence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..common.load_report import LoadReport

ADMIT = "admit"
KV_FULL = "kv_headroom"
TOO_LARGE = "too_large"
SLO = "deadline"


@dataclass(frozen=True)
class AdmissionPolicy:
    enabled: bool = True
    ttft_slo_s: float = 10.0  # reject when the estimated wait for a first token is longer
    kv_reserve_fraction: float = 0.05  # of each decode worker's KV kept back for running sequences to grow
    min_retry_after_s: float = 1.0
    max_retry_after_s: float = 30.0

    def __post_init__(self) -> None:
        if self.ttft_slo_s <= 0:
            raise ValueError(f"ttft_slo_s must be > 0, got {self.ttft_slo_s}")
        if not 0 <= self.kv_reserve_fraction < 1:
            raise ValueError(f"kv_reserve_fraction must be in [0, 1), got {self.kv_reserve_fraction}")
        if not 0 < self.min_retry_after_s <= self.max_retry_after_s:
            raise ValueError("need 0 < min_retry_after_s <= max_retry_after_s")


@dataclass(frozen=True)
class AdmissionRequest:
    prompt_tokens: int
    max_tokens: int
    deadline_s: float  # seconds left until the request's own end-to-end deadline

    @property
    def kv_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


@dataclass(frozen=True)
class Verdict:
    reason: str  # ADMIT, KV_FULL, TOO_LARGE or SLO
    message: str = ""
    retry_after_s: float | None = None
    estimated_wait_s: float = 0.0

    @property
    def admitted(self) -> bool:
        return self.reason == ADMIT


def kv_room(worker: LoadReport, reserve_fraction: float) -> int:
    """Tokens of KV a new request could take on this worker now."""
    reserve = math.ceil(worker.kv_capacity_tokens * reserve_fraction)
    return worker.kv_capacity_tokens - worker.kv_used_tokens - worker.queued_tokens - reserve


@dataclass(frozen=True)
class FleetView:
    """What admission needs from the reports, summed once per directory refresh (not per request)."""

    largest_kv: int = 0  # the largest KV capacity of a live decode worker; 0: unknown
    best_room: int = 0  # the most KV room any live decode worker has
    decode_tokens_per_s: float = 0.0
    queued_tokens: int = 0  # prompt tokens reported waiting in prefill and decode
    prefill_tokens_per_s: float = 0.0  # throughput of the backlogged prefill workers


def summarize(prefill: Sequence[LoadReport], decode: Sequence[LoadReport], policy: AdmissionPolicy) -> FleetView:
    live = [w for w in decode if not w.draining and w.kv_capacity_tokens > 0]
    backlogged = [w for w in prefill if w.queued_tokens > 0 and w.prompt_tokens_per_s > 0]
    return FleetView(
        largest_kv=max((w.kv_capacity_tokens for w in live), default=0),
        best_room=max((kv_room(w, policy.kv_reserve_fraction) for w in live), default=0),
        decode_tokens_per_s=sum(w.output_tokens_per_s for w in live),
        queued_tokens=sum(w.queued_tokens for w in prefill) + sum(w.queued_tokens for w in decode),
        prefill_tokens_per_s=sum(w.prompt_tokens_per_s for w in backlogged),
    )


def estimated_wait_s(fleet: FleetView, local_queued_tokens: int, prompt_tokens: int) -> float | None:
    """Seconds until this prompt's first token, or None when throughput is not measured."""
    # Our own waiting requests may not be in a report yet; theirs are, so take the larger.
    ahead = max(fleet.queued_tokens, local_queued_tokens)
    if ahead == 0:
        return 0.0
    if fleet.prefill_tokens_per_s <= 0:
        return None
    return (ahead + prompt_tokens) / fleet.prefill_tokens_per_s


def decide(req: AdmissionRequest, fleet: FleetView, local_queued_tokens: int, policy: AdmissionPolicy) -> Verdict:
    if not policy.enabled:
        return Verdict(ADMIT)
    if fleet.largest_kv:
        if req.kv_tokens > fleet.largest_kv:
            return Verdict(TOO_LARGE, f"prompt + max_tokens is {req.kv_tokens} tokens; no decode worker can hold "
                                      f"more than {fleet.largest_kv} tokens of KV")
        if fleet.best_room < req.kv_tokens:
            deficit = req.kv_tokens - fleet.best_room
            rate = fleet.decode_tokens_per_s
            # A rough guess: running work moves toward its end at the fleet's token rate.
            wait = deficit / rate if rate > 0 else policy.max_retry_after_s
            return Verdict(KV_FULL, f"no decode worker has KV room for {req.kv_tokens} tokens (prompt + max_tokens) "
                                    f"now; the most any worker has is {max(fleet.best_room, 0)}",
                           _clamp(wait, policy))
    wait = estimated_wait_s(fleet, local_queued_tokens, req.prompt_tokens)
    if wait is not None:
        budget = min(policy.ttft_slo_s, req.deadline_s)
        if wait > budget:
            which = "TTFT SLO" if policy.ttft_slo_s <= req.deadline_s else "request deadline"
            return Verdict(SLO, f"the estimated wait for a first token is {wait:.1f} s, beyond the "
                                f"{which} of {budget:.1f} s", _clamp(wait - budget, policy), wait)
    return Verdict(ADMIT, estimated_wait_s=wait or 0.0)


def _clamp(seconds: float, policy: AdmissionPolicy) -> float:
    return min(max(seconds, policy.min_retry_after_s), policy.max_retry_after_s)
