"""Small rolling statistics for load reports: token rates and latency percentiles."""

from __future__ import annotations

import time
from collections import deque


class RateWindow:
    """Events per second over the last `window_s` seconds."""

    def __init__(self, window_s: float = 5.0):
        self.window_s = window_s
        self._events: deque[tuple[float, float]] = deque()
        self._total = 0.0

    def add(self, amount: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._events.append((now, amount))
        self._total += amount
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._total -= self._events.popleft()[1]

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._trim(now)
        return self._total / self.window_s


class LatencyWindow:
    """Percentiles of the last `size` samples."""

    def __init__(self, size: int = 512):
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self._samples.append(value)

    def percentile(self, q: float) -> float:
        if not self._samples:
            return 0.0
        ordered = sorted(self._samples)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]
