"""Which expert group serves which experts, and how a step's tokens are split among groups. Pure.

A `Placement` maps each expert index (the same index in every MoE layer) to one or more groups.
Each group is its own Deployment (stage `experts/<group>`, scaled on the tokens routed to it).
An expert in several groups is *replicated*: its tokens are split between those groups so that
the groups' loads come out as even as possible (`split_tokens`). A placement update only adds
or moves copies; servers load any expert they are sent, so requests routed by the old or the
new table both succeed while workers pick up the new one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

GROUP_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?")  # a Kubernetes name fragment


GROUP_STAGE_PREFIX = "experts/"


def stage_of(group: str) -> str:
    """The registry stage of an expert group (scaler metadata: `stage: experts` and `group`)."""
    return GROUP_STAGE_PREFIX + group


@dataclass(frozen=True)
class Placement:
    num_experts: int
    groups: Mapping[str, tuple[int, ...]]  # group -> its experts, ascending
    version: int = 1
    _of: dict[int, tuple[str, ...]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not self.groups:
            raise ValueError("a placement needs at least one group")
        for name, experts in self.groups.items():
            if not GROUP_NAME.fullmatch(name):
                raise ValueError(f"group name {name!r} is invalid: want lowercase letters, digits and '-', 1-40 long")
            if len(set(experts)) != len(experts) or any(not 0 <= e < self.num_experts for e in experts):
                raise ValueError(f"group {name}: experts must be distinct and in 0..{self.num_experts - 1}, got {list(experts)}")
        of: dict[int, list[str]] = {e: [] for e in range(self.num_experts)}
        for name in sorted(self.groups):
            for e in self.groups[name]:
                of[e].append(name)
        homeless = [e for e, gs in of.items() if not gs]
        if homeless:
            raise ValueError(f"experts {homeless} are in no group; every expert needs at least one")
        self._of.update({e: tuple(gs) for e, gs in of.items()})

    @classmethod
    def even(cls, num_experts: int, num_groups: int) -> "Placement":
        """Contiguous blocks of experts in groups g0, g1, ...; the first groups get one more when
        the count does not divide evenly."""
        if not 1 <= num_groups <= num_experts:
            raise ValueError(f"num_groups must be in 1..{num_experts} (the expert count), got {num_groups}")
        size, extra = divmod(num_experts, num_groups)
        groups, start = {}, 0
        for i in range(num_groups):
            n = size + (1 if i < extra else 0)
            groups[f"g{i}"] = tuple(range(start, start + n))
            start += n
        return cls(num_experts, groups)

    def groups_of(self, expert: int) -> tuple[str, ...]:
        return self._of[expert]

    def replicate(self, expert: int, group: str) -> "Placement":
        """A copy of `expert` in `group` too (a new group is created if needed); version + 1."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert must be in 0..{self.num_experts - 1}, got {expert}")
        current = self.groups.get(group, ())
        if expert in current:
            return self
        groups = {**self.groups, group: tuple(sorted(current + (expert,)))}
        return Placement(self.num_experts, groups, self.version + 1)

    def to_json(self) -> str:
        return json.dumps({"num_experts": self.num_experts, "version": self.version,
                           "groups": {g: list(e) for g, e in sorted(self.groups.items())}}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Placement":
        raw = json.loads(text)
        return cls(int(raw["num_experts"]), {g: tuple(int(e) for e in es) for g, es in raw["groups"].items()},
                   int(raw["version"]))


def split_tokens(counts: Mapping[int, int], placement: Placement) -> dict[int, dict[str, int]]:
    """expert -> {group: tokens} for one step's per-expert token counts.

    Experts in one group go there. A replicated expert's tokens fill its groups up to a common
    level (water filling over what the groups already carry this step), hottest expert first.
    """
    load = {g: 0 for g in placement.groups}
    plan: dict[int, dict[str, int]] = {}
    replicated = []
    for e, n in counts.items():
        if n <= 0:
            continue
        groups = placement.groups_of(e)
        if len(groups) == 1:
            plan[e] = {groups[0]: n}
            load[groups[0]] += n
        else:
            replicated.append(e)
    for e in sorted(replicated, key=lambda x: (-counts[x], x)):
        shares = water_fill(counts[e], [load[g] for g in placement.groups_of(e)])
        plan[e] = {g: s for g, s in zip(placement.groups_of(e), shares) if s > 0}
        for g, s in plan[e].items():
            load[g] += s
    return plan


def water_fill(amount: int, loads: Sequence[int]) -> list[int]:
    """Integer shares of `amount` that bring the lowest loads up to one level; ties go to the first."""
    order = sorted(range(len(loads)), key=lambda i: (loads[i], i))
    shares = [0] * len(loads)
    remaining = amount
    for k in range(1, len(order) + 1):  # raise the k lowest to the next load (or as far as amount goes)
        lowest = order[:k]
        level = loads[order[k]] if k < len(order) else math.inf
        room = sum(level - (loads[i] + shares[i]) for i in lowest)
        if room >= remaining:
            base, extra = divmod(remaining, k)
            for rank, i in enumerate(lowest):
                shares[i] += base + (1 if rank < extra else 0)
            return shares
        for i in lowest:
            remaining -= level - (loads[i] + shares[i])
            shares[i] = level - loads[i]
    return shares


def group_rates(expert_rates: Mapping[int, float], placement: Placement) -> dict[str, float]:
    """Tokens/s each group carries when the callers split replicated experts as `split_tokens`
    does (computed in micro-tokens, so the integer water filling applies)."""
    scale = 1e6
    plan = split_tokens({e: round(r * scale) for e, r in expert_rates.items()}, placement)
    rates = {g: 0.0 for g in placement.groups}
    for shares in plan.values():
        for g, n in shares.items():
            rates[g] += n / scale
    return rates


def replicate_hottest(
    expert_rates: Mapping[int, float], placement: Placement, imbalance: float = 1.1
) -> Placement | None:
    """When the busiest group carries more than `imbalance` x the mean, copy its hottest expert into
    the least-loaded group that lacks it; None when balanced enough or nothing helps. Feed it the
    per-expert token rates (`keys.expert_tokens` over time) and call it until it returns None."""
    rates = group_rates(expert_rates, placement)
    mean = sum(rates.values()) / len(rates)
    hot = max(rates, key=lambda g: (rates[g], g))
    if mean <= 0 or rates[hot] <= imbalance * mean:
        return None
    candidates = sorted(placement.groups[hot], key=lambda e: (-expert_rates.get(e, 0.0), e))
    for e in candidates:
        targets = [g for g in placement.groups if e not in placement.groups[g]]
        if targets:
            better = placement.replicate(e, min(targets, key=lambda g: (rates[g], g)))
            if max(group_rates(expert_rates, better).values()) < rates[hot]:
                return better
    return None


@dataclass(frozen=True)
class Replica:
    """One live experts server of a group, as its load report shows it."""

    worker_id: str
    address: str
    queued_tokens: int = 0  # tokens in the server's calls right now
    tokens_per_s: float = 0.0


def least_loaded(replicas: Sequence[Replica], sent_recently: Mapping[str, float]) -> Replica:
    """The replica with the least work: reported in-flight tokens plus what this caller sent it
    since (reports are a second old; without the local count every caller would herd onto the
    same replica until the next report). Ties: lower reported rate, then worker id."""
    if not replicas:
        raise ValueError("no replica to choose from")
    return min(replicas, key=lambda r: (r.queued_tokens + sent_recently.get(r.worker_id, 0.0), r.tokens_per_s, r.worker_id))
