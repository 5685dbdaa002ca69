"""Step timing profile: what each engine step did and how long it took.

The decode engine records one StepRecord per step in a bounded ring. The tuner and the
simulator read it to build service-time models: `fit()` gives
ms ~= base + per_decode * decode tokens + per_prefill * prefill tokens + per_context * KV
positions attended, by least squares. Pure Python, no torch.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class StepRecord:
    time: float  # unix seconds at the end of the step
    batch_size: int  # sequences in the step
    decode_tokens: int  # one per running sequence
    prefill_tokens: int  # prompt (or recompute) chunk tokens
    context_tokens: int  # KV positions attended, summed over the step's sequences
    ms: float

    @property
    def tokens(self) -> int:
        return self.decode_tokens + self.prefill_tokens


@dataclass(frozen=True)
class ServiceTimeModel:
    base_ms: float
    per_decode_ms: float
    per_prefill_ms: float
    per_context_ms: float
    samples: int

    def predict(self, decode_tokens: int, prefill_tokens: int = 0, context_tokens: int = 0) -> float:
        return (self.base_ms + self.per_decode_ms * decode_tokens + self.per_prefill_ms * prefill_tokens
                + self.per_context_ms * context_tokens)


class StepProfile:
    """A bounded ring of StepRecords; written by the engine thread, read from anywhere."""

    def __init__(self, capacity: int = 4096):
        self._ring: deque[StepRecord] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def record(self, step: StepRecord) -> None:
        with self._lock:
            self._ring.append(step)

    def records(self) -> list[StepRecord]:
        with self._lock:
            return list(self._ring)

    def __len__(self) -> int:
        return len(self._ring)

    def summary(self) -> dict:
        """Aggregates for a report: steps, mean and p50/p95 step time, mean batch and tokens,
        throughput while busy."""
        steps = self.records()
        if not steps:
            return {"steps": 0}
        ms = sorted(s.ms for s in steps)
        busy_s = sum(ms) / 1000
        return {
            "steps": len(steps),
            "ms_mean": sum(ms) / len(ms),
            "ms_p50": ms[len(ms) // 2],
            "ms_p95": ms[min(len(ms) - 1, int(len(ms) * 0.95))],
            "batch_mean": sum(s.batch_size for s in steps) / len(steps),
            "decode_tokens": sum(s.decode_tokens for s in steps),
            "prefill_tokens": sum(s.prefill_tokens for s in steps),
            "tokens_per_busy_s": sum(s.tokens for s in steps) / busy_s if busy_s else 0.0,
        }

    def fit(self, last: int = 0) -> ServiceTimeModel | None:
        """Least-squares service-time model over the ring (its newest `last` steps if > 0); None
        with too few distinct steps. Features that never vary (e.g. no prefill seen) get a
        zero coefficient."""
        steps = self.records()[-last:] if last > 0 else self.records()
        rows = [(1.0, s.decode_tokens, s.prefill_tokens, s.context_tokens) for s in steps]
        active = [0] + [j for j in (1, 2, 3) if len({r[j] for r in rows}) > 1]
        if len(steps) < 2 * len(active):
            return None
        x = [[r[j] for j in active] for r in rows]
        y = [s.ms for s in steps]
        coef = _least_squares(x, y)
        if coef is None:
            return None
        full = [0.0] * 4
        for j, c in zip(active, coef):
            full[j] = c
        return ServiceTimeModel(*full, samples=len(steps))


def _least_squares(x: list[list[float]], y: list[float]) -> list[float] | None:
    """Solve the normal equations (X^T X) b = X^T y by Gaussian elimination with pivoting."""
    k = len(x[0])
    a = [[sum(r[i] * r[j] for r in x) for j in range(k)] + [sum(r[i] * t for r, t in zip(x, y))] for i in range(k)]
    for col in range(k):
        pivot = max(range(col, k), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(k):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [u - f * v for u, v in zip(a[r], a[col])]
    return [a[i][k] / a[i][i] for i in range(k)]


def as_dicts(steps: list[StepRecord]) -> list[dict]:
    return [asdict(s) for s in steps]
