"""A sliding time window of samples: the rate and quantiles a load report covers. Pure."""

from __future__ import annotations

from collections import deque


class Window:
    """Samples (time, value, weight) of the last `span_s` seconds (times must not decrease much:
    samples are pruned from the oldest end)."""

    def __init__(self, span_s: float):
        if span_s <= 0:
            raise ValueError("a window needs a positive span")
        self.span_s = span_s
        self._items: deque[tuple[float, float, float]] = deque()
        self._total = 0.0  # sum of value * weight

    def add(self, t: float, value: float, weight: float = 1.0) -> None:
        self._items.append((t, value, weight))
        self._total += value * weight

    def _prune(self, now: float) -> None:
        items, cutoff = self._items, now - self.span_s
        while items and items[0][0] <= cutoff:
            _, value, weight = items.popleft()
            self._total -= value * weight

    def rate(self, now: float) -> float:
        """Sum of value x weight over the window, per second."""
        self._prune(now)
        return max(self._total, 0.0) / self.span_s

    def quantile(self, now: float, q: float) -> float | None:
        """The weighted q-quantile of the values in the window (None: empty)."""
        self._prune(now)
        if not self._items:
            return None
        ranked = sorted((v, w) for _, v, w in self._items)
        goal, seen = q * sum(w for _, w in ranked), 0.0
        for value, weight in ranked:
            seen += weight
            if seen >= goal:
                return value
        return ranked[-1][0]
