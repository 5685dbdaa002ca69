"""Knee profiling: the smallest GPU share that gives (almost) the best throughput.

Definition: with `best` the highest throughput observed at any share, the knee is the smallest
share whose throughput is >= (1 - epsilon) * best. Using the best observation as the reference
(not the throughput at share 1.0) keeps the definition stable when the curve is noisy or dips
at the top. Repeated measurements at one share are averaged first. Beyond the knee, extra share
buys less than epsilon; below it, the stage is compute-bound and slows with the share. The knee
moves with the batch size (a batch-1 decode step is memory-bound and barely notices the share;
a batch-256 step is not), which is why share and runtime settings are tuned together.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

from .table import ProfilePoint


def _by_share(points: Sequence[tuple[float, float]]) -> dict[float, float]:
    sums: dict[float, list[float]] = defaultdict(list)
    for share, throughput in points:
        sums[share].append(throughput)
    return {share: sum(values) / len(values) for share, values in sums.items()}


def find_knee(points: Sequence[tuple[float, float]], epsilon: float = 0.05) -> float:
    """The knee share of (share, throughput) measurements (see the module docstring)."""
    if not points:
        raise ValueError("find_knee needs at least one (share, throughput) point")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    curve = _by_share(points)
    floor = (1.0 - epsilon) * max(curve.values())
    return min(share for share, throughput in curve.items() if throughput >= floor)


def knees_by_batch(points: Sequence[ProfilePoint], epsilon: float = 0.05) -> dict[int, float]:
    """{max_batch_size: knee share} for the points of one (model, stage, device).

    Configs sharing a batch size (other knobs differing) count with their best throughput at
    each share: the knee is where the best setting for that batch size stops gaining.
    """
    groups = {(p.model, p.stage, p.device) for p in points}
    if len(groups) > 1:
        raise ValueError(f"knees_by_batch wants one (model, stage, device), got {sorted(groups)}")
    best: dict[int, dict[float, float]] = defaultdict(dict)
    for p in points:
        at = best[p.batch]
        at[p.share] = max(at.get(p.share, 0.0), p.throughput_tokens_per_s)
    return {batch: find_knee(list(curve.items()), epsilon) for batch, curve in sorted(best.items())}


def share_grid(lo: float, hi: float, step: float) -> list[float]:
    """lo, lo + step, ... up to hi (hi always included), rounded to 6 places."""
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"need 0 < lo <= hi <= 1, got lo={lo} hi={hi}")
    if step <= 0.0:
        raise ValueError(f"step must be > 0, got {step}")
    grid: list[float] = []
    i = 0
    while lo + i * step < hi - 1e-9:
        grid.append(round(lo + i * step, 6))
        i += 1
    grid.append(round(hi, 6))
    return grid


class KneeSearch:
    """The adaptive knee search of one curve, one measurement at a time.

    The profiler runs many curves (stage x batch size x workload) at once and measures, in
    each round, every share some curve asks for in one process per share; so the search is a
    state machine: next_share() says what it wants, record() takes the result, done/knee say
    where it ended. Assumes throughput is non-decreasing in share up to noise: measures hi and
    lo, then bisects on "within epsilon of the best so far". The answer is within epsilon of
    the best measured, and every measured share below it is not (noise can hide a lower
    qualifying share that was never measured; the grid search has no such blind spot, at ~3x
    the cost).
    """

    def __init__(self, lo: float = 0.1, hi: float = 1.0, epsilon: float = 0.05, min_step: float = 0.05,
                 grid: Sequence[float] | None = None):
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
        self.grid = sorted(grid) if grid else share_grid(lo, hi, min_step)
        self.epsilon = epsilon
        self.measured: dict[float, float] = {}
        # Invariant once both ends are known: grid[low] fails; grid[high] passes against the
        # final best. A measurement that raises the best passes and becomes high; those after it
        # fail, so the best never changes after the last move of high.
        self._low: int | None = None
        self._high = len(self.grid) - 1
        self.knee: float | None = None

    @property
    def done(self) -> bool:
        return self.knee is not None

    def _passes(self, value: float) -> bool:
        return value >= (1.0 - self.epsilon) * max(self.measured.values())

    def next_share(self) -> float | None:
        """The share to measure next; None once the knee is known."""
        if self.knee is not None:
            return None
        if self.grid[-1] not in self.measured:
            return self.grid[-1]
        if self.grid[0] not in self.measured:
            return self.grid[0]
        return self.grid[(self._low + self._high) // 2]

    def record(self, share: float, throughput: float) -> None:
        if share != self.next_share():
            raise ValueError(f"expected a measurement at share {self.next_share()}, got {share}")
        self.measured[share] = throughput
        top = len(self.grid) - 1
        if share == self.grid[top] and top > 0:
            return
        if share == self.grid[0]:
            if self._passes(throughput):  # lo is already within epsilon of the best
                self.knee = self.grid[0]
                return
            self._low = 0
        else:
            mid = self.grid.index(share)
            if self._passes(throughput):
                self._high = mid
            else:
                self._low = mid
        if self._high - self._low <= 1:
            self.knee = self.grid[self._high]


def adaptive_shares(
    measure: Callable[[float], float],
    lo: float = 0.1,
    hi: float = 1.0,
    epsilon: float = 0.05,
    min_step: float = 0.05,
) -> tuple[float, dict[float, float]]:
    """Find the knee on share_grid(lo, hi, min_step) without measuring the whole grid (one
    KneeSearch driven to the end). Returns (knee, {share: throughput measured}); len() of the
    dict is the number of measurements taken (each share is measured once).
    """
    search = KneeSearch(lo, hi, epsilon, min_step)
    while (share := search.next_share()) is not None:
        search.record(share, measure(share))
    assert search.knee is not None
    return search.knee, search.measured
