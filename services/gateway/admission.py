"""Admission control: admit a request only if the fleet can hold it and serve it in time (pure).

Two questions, answered from the workers' load reports (about a second old):

1. KV headroom: does some decode worker have room for the request's prompt + max_tokens,
   after the prompts already waiting on it and a reserve for running sequences to grow?
   If no worker could hold it even when empty, retrying cannot help: that is bad input
   (HTTP 400), not overload.
2. Deadline feasibility: how long until this prompt's first token? Per prefill worker, the
   time to drain its queue, estimated two ways: queued tokens / its measured token rate, and
   micro-batches ahead (queued prompts / max_batch_size) x its median batch time. The rate
   lags after an idle spell (it averages 5 s, idle time included), the batch count misjudges
   long prompts, so the smaller of the two is taken: a request is refused only when both say
   it is late. The router sends work to the less loaded of two workers, so the fleet's wait
   is the shortest worker's (the prompt's own batch included in the count). If that is longer than the
   TTFT SLO or the request's own deadline, the request would miss it anyway: reject now,
   while the client can still go elsewhere, instead of after the wait.

Unknowns admit: no reports, no capacity reported, no throughput measured yet. Within one
report interval a burst is not seen here; the workers' bounded queues (RESOURCE_EXHAUSTED)
are the last line of defence.
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
    """What admission needs from the reports, computed once per directory refresh (not per request)."""

    largest_kv: int = 0  # the largest KV capacity of a live decode worker; 0: unknown
    best_room: int = 0  # the most KV room any live decode worker has
    decode_tokens_per_s: float = 0.0
    first_token_wait_s: float | None = 0.0  # shortest estimated prefill wait; None: not measured


def prefill_wait_s(worker: LoadReport) -> float | None:
    """Seconds until a prompt sent to this worker now would be in a finished batch; None: unknown."""
    if worker.queued_tokens == 0 and worker.queue_len == 0:
        return 0.0  # its own batch is compute, not waiting; a median batch may be far longer
    batch_s = worker.step_ms_p50 / 1000
    guesses = []
    if worker.prompt_tokens_per_s > 0:
        guesses.append(worker.queued_tokens / worker.prompt_tokens_per_s)
    if batch_s > 0 and worker.config is not None and worker.config.max_batch_size > 0:
        guesses.append(math.ceil(worker.queue_len / worker.config.max_batch_size) * batch_s)
    return min(guesses) if guesses else None


def summarize(prefill: Sequence[LoadReport], decode: Sequence[LoadReport], policy: AdmissionPolicy) -> FleetView:
    live = [w for w in decode if not w.draining and w.kv_capacity_tokens > 0]
    waits = [prefill_wait_s(w) for w in prefill if not w.draining]
    known = [w for w in waits if w is not None]
    return FleetView(
        largest_kv=max((w.kv_capacity_tokens for w in live), default=0),
        best_room=max((kv_room(w, policy.kv_reserve_fraction) for w in live), default=0),
        decode_tokens_per_s=sum(w.output_tokens_per_s for w in live),
        # no prefill worker: decode prefills locally, nothing to judge; none measured: unknown
        first_token_wait_s=min(known) if known else (0.0 if not waits else None),
    )


def decide(req: AdmissionRequest, fleet: FleetView, policy: AdmissionPolicy) -> Verdict:
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
    wait = fleet.first_token_wait_s
    if wait is not None:
        budget = min(policy.ttft_slo_s, req.deadline_s)
        if wait > budget:
            which = "TTFT SLO" if policy.ttft_slo_s <= req.deadline_s else "request deadline"
            return Verdict(SLO, f"the estimated wait for a first token is {wait:.1f} s, beyond the "
                                f"{which} of {budget:.1f} s", _clamp(wait - budget, policy), wait)
    return Verdict(ADMIT, estimated_wait_s=wait or 0.0)


def _clamp(seconds: float, policy: AdmissionPolicy) -> float:
    return min(max(seconds, policy.min_retry_after_s), policy.max_retry_after_s)
