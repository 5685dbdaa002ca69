"""The experts stage of an MoE model in the simulator: routed load, expert groups, their latency. Pure.

Routing (MoeSpec): every token a decode step makes and every prompt token a prefill micro-batch
computes is routed, at each of the model's MoE layers, to `top_k` of `experts` experts. Expert e
draws a share of the (token, expert) pairs proportional to 1 / (e + 1) ** skew (Zipf; expert 0 is
the hottest, skew 0 is uniform); the experts sit in groups as the real stack places them
(services/experts/placement.py, Placement.even: contiguous blocks, so g0 holds the hot ones).
Each step sends every group its expected share of the pairs, not a sampled one: deterministic,
worked out once per batch size, and no draws from the run's RNG (a run without experts makes
exactly the draws it made before this module existed).

Latency: a call of P pairs to a group takes S = ExpertsModel.call_ms(P, share, micro-batch) of one
replica's device time. An experts server queues pieces, not calls (services/experts/micro_batch.py),
so concurrent calls share its device: a replica is a processor-sharing queue, whose mean response
is S / (1 - rho) whatever the service-time distribution (M/G/1-PS), rho being the group's device
time demanded per second (over the load-report window) per ready replica. That open-system figure
assumes endless callers; here a caller (a decode pod with sequences, a prefill pod with a
micro-batch) has at most one call out per group, since it waits for the answer, so N such
callers spread over a group's n replicas put at most (N - 1) / n other calls beside a call (a
lone caller never queues behind itself). The response is the smaller of the two:
    R_g = S_g x min(1 / (1 - rho_g), 1 + (N - 1) / n_g)       (rho_g >= 1: the second)
A step makes one call per MoE layer, to every group at once, and goes on when the slowest answers:
    step's experts wait = layers x max over groups of R_g
The loop is closed, as in the real stack: an overloaded group slows the steps that wait on it,
which lowers the routed rate.

Signals: a group's ready pods become the LoadReports its experts servers would publish (routed
pairs/s as prompt_tokens_per_s, calls and pairs in flight by Little's law), the simulated gateway
adds its report, and services.scaler.signal_source.stage_view (the real scaler's aggregation)
turns them into the group's StageSignals and activity.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from services.common.load_report import LoadReport
from services.experts.placement import Placement, stage_of
from services.scaler.signal_source import stage_view
from services.scaler.signals import StageSignals

from .profile import ExpertsModel

@dataclass(frozen=True)
class MoeSpec:
    """How a workload's tokens reach the experts (an experiment's `moe:` block)."""

    experts: int
    top_k: int
    groups: int
    skew: float = 0.0  # Zipf exponent over the expert index; 0: uniform

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"moe.top_k must be in 1..{self.experts} (moe.experts), got {self.top_k}")
        if not 1 <= self.groups <= self.experts:
            raise ValueError(f"moe.groups must be in 1..{self.experts} (moe.experts), got {self.groups}")
        if not self.skew >= 0:
            raise ValueError(f"moe.skew must be >= 0, got {self.skew}")

    def placement(self) -> Placement:
        return Placement.even(self.experts, self.groups)

    def group_shares(self) -> dict[str, float]:
        """{stage experts/<group>: its fraction of the routed pairs}, in group order (g0 first)."""
        weights = [1.0 / (e + 1) ** self.skew for e in range(self.experts)]
        total = sum(weights)
        placement = self.placement()
        return {stage_of(g): sum(weights[e] for e in placement.groups[g]) / total
                for g in sorted(placement.groups, key=lambda name: int(name[1:]))}

    def stages(self) -> tuple[str, ...]:
        return tuple(self.group_shares())


class ExpertGroup:
    """One group's routed load over the load-report window: pairs, device seconds and calls.

    One deque for the three (not three Windows): every call adds to all of them at once, and this
    is the simulator's hottest path with experts on. The sums are kept as Window keeps its own
    (added and pruned in the same order), so the rates are the same floats."""

    def __init__(self, stage: str, fraction: float, window_s: float):
        if window_s <= 0:
            raise ValueError("a window needs a positive span")
        self.stage, self.fraction, self.span_s = stage, fraction, window_s
        self._items: deque[tuple[float, float, float, float]] = deque()  # (time, pairs, seconds, calls)
        self._pairs = self._work = self._calls = 0.0

    def add(self, now: float, pairs: float, work_s: float, calls: float) -> None:
        self._items.append((now, pairs, work_s, calls))
        self._pairs += pairs
        self._work += work_s
        self._calls += calls

    def _prune(self, now: float) -> None:
        items, cutoff = self._items, now - self.span_s
        while items and items[0][0] <= cutoff:
            _, pairs, work_s, calls = items.popleft()
            self._pairs -= pairs
            self._work -= work_s
            self._calls -= calls

    def work_rate(self, now: float) -> float:
        """Device seconds per second over the window (the group's offered load, in devices)."""
        self._prune(now)
        return max(self._work, 0.0) / self.span_s

    def rates(self, now: float) -> tuple[float, float, float]:
        """(pairs/s, calls/s, device seconds/s) over the window."""
        self._prune(now)
        return (max(self._pairs, 0.0) / self.span_s, max(self._calls, 0.0) / self.span_s,
                max(self._work, 0.0) / self.span_s)


class ExpertsStage:
    """Every expert group of a run; `ready` maps a group's stage to its ready pods (the simulator's
    accepting lists), which set how many replicas share the group's load. `callers` is how many
    pods are computing now (the simulator counts them in and out)."""

    def __init__(self, spec: MoeSpec, model: ExpertsModel, share: float, micro_batch: int, window_s: float,
                 ready: dict[str, list]):
        self.spec, self.model, self.share, self.micro_batch = spec, model, share, micro_batch
        self.groups = [ExpertGroup(stage, f, window_s) for stage, f in spec.group_shares().items()]
        self.by_stage = {g.stage: g for g in self.groups}
        self.ready = ready
        self.callers = 0
        self._calls: dict[int, list[tuple[float, float]]] = {}  # tokens -> per group (pairs, device ms)

    def calls(self, tokens: int) -> list[tuple[float, float]]:
        """Per group, the pairs and device ms of one MoE layer's call for `tokens` tokens."""
        found = self._calls.get(tokens)
        if found is None:
            k, m = self.spec.top_k, self.model
            found = []
            for g in self.groups:
                pairs = tokens * k * g.fraction
                found.append((pairs, m.call_ms(pairs, self.share, self.micro_batch)))
            self._calls[tokens] = found
        return found

    def rho(self, group: ExpertGroup, now: float) -> float:
        n = len(self.ready[group.stage])
        return group.work_rate(now) / n if n else math.inf

    def stretch(self, group: ExpertGroup, now: float) -> float:
        """R / S for a call to the group now (see the module docstring)."""
        return call_stretch(self.rho(group, now), self.callers, len(self.ready[group.stage]))

    def delay_s(self, tokens: int, now: float) -> float:
        """How long a step (or prefill micro-batch) of `tokens` tokens waits on its experts."""
        if tokens <= 0:
            return 0.0
        worst = 0.0
        for g, (_, ms) in zip(self.groups, self.calls(tokens)):
            if ms > 0:
                worst = max(worst, ms * self.stretch(g, now))
        return self.model.layers * worst / 1000.0

    def account(self, tokens: int, steps: int, now: float) -> None:
        """`steps` steps of `tokens` tokens each were routed (their calls were made by `now`)."""
        if tokens <= 0 or steps <= 0:
            return
        calls = self.model.layers * steps
        for g, (pairs, ms) in zip(self.groups, self.calls(tokens)):
            if pairs > 0:
                g.add(now, pairs * calls, ms * calls / 1000.0, calls)

    def view(self, stage: str, now: float, pending: int, gateway: LoadReport) -> tuple[StageSignals, bool]:
        """The group's signals and activity, as the real scaler reads them from the store."""
        g = self.by_stage[stage]
        ready = self.ready[stage]
        n = len(ready)
        routed, calls, work = g.rates(now)
        # Little's law: in flight = arrival rate x time in the server (mean device time, stretched).
        response = (work / calls) * self.stretch(g, now) if calls > 0 else 0.0
        reports = [LoadReport(worker_id=f"{stage}-{pod.pod_id}", stage=stage, address="", host_id="", model="",
                              timestamp_unix=now, queue_len=int(round(calls * response / n)),
                              queued_tokens=int(round(routed * response / n)), prompt_tokens_per_s=routed / n,
                              gpu_share=pod.share) for pod in ready]
        v = stage_view(stage, reports, [gateway], n + pending, now)
        return v.signals, v.active


def call_stretch(rho: float, callers: int, replicas: int) -> float:
    """R / S of a call to a group at utilisation `rho` per replica, with `callers` pods calling
    `replicas` replicas (see the module docstring)."""
    bound = 1.0 + max(callers - 1, 0) / max(replicas, 1)
    return min(1.0 / (1.0 - rho), bound) if rho < 1.0 else bound


def unloaded_wait_ms(spec: MoeSpec, model: ExpertsModel, share: float, micro_batch: int, tokens: float) -> float:
    """What `tokens` tokens wait on idle expert groups: every layer's slowest group's call."""
    return loaded_wait_ms(spec, model, share, micro_batch, tokens, {})


def loaded_wait_ms(spec: MoeSpec, model: ExpertsModel, share: float, micro_batch: int, tokens: float,
                   stretch: dict[str, float]) -> float:
    """What `tokens` tokens wait on their experts when each group's calls are stretched by
    `stretch[group]` (call_stretch; a group not named is idle): every layer's slowest group's call."""
    if tokens <= 0:
        return 0.0
    worst = max(model.call_ms(tokens * spec.top_k * f, share, micro_batch) * stretch.get(g, 1.0)
                for g, f in spec.group_shares().items())
    return model.layers * worst


def typical_call_pairs(batch: int, spec: MoeSpec) -> int:
    """Pairs in a full decode batch's call to an average group: what the experts table rows are measured at."""
    return max(int(math.ceil(batch * spec.top_k / spec.groups)), 1)
