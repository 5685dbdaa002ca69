"""Per-API-key token-rate budgets: one token bucket per key, in this gateway (pure).

A request is charged prompt + max_tokens when it is admitted, since its real length is not
known yet; when it ends, the tokens it did not generate are given back. So a key is never
over its rate for long, and short answers do not use up a budget they did not need.
Each gateway replica keeps its own buckets: with N gateways a key gets up to N x the rate.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Bucket:
    level: float
    updated: float


@dataclass(frozen=True)
class Charge:
    ok: bool
    retry_after_s: float = 0.0  # when not ok: seconds until the bucket holds the cost


class TokenBudgets:
    def __init__(self, tokens_per_s: float, burst_tokens: float, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000):
        if tokens_per_s <= 0 or burst_tokens <= 0:
            raise ValueError("tokens_per_s and burst_tokens must be > 0")
        self.rate = tokens_per_s
        self.burst = burst_tokens
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()  # least recently used first

    def _bucket(self, key: str) -> Bucket:
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = Bucket(self.burst, now)
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)  # a forgotten key starts full again: it has been idle longest
        else:
            self._buckets.move_to_end(key)
            bucket.level = min(self.burst, bucket.level + (now - bucket.updated) * self.rate)
            bucket.updated = now
        return bucket

    def charge(self, key: str, tokens: int) -> Charge:
        """Take `tokens` from the key's bucket, or say how long until it could."""
        if tokens > self.burst:
            raise ValueError(f"a request of {tokens} tokens can never fit a burst of {self.burst:.0f}")
        bucket = self._bucket(key)
        if bucket.level >= tokens:
            bucket.level -= tokens
            return Charge(True)
        return Charge(False, (tokens - bucket.level) / self.rate)

    def refund(self, key: str, tokens: int) -> None:
        if tokens > 0:
            bucket = self._bucket(key)
            bucket.level = min(self.burst, bucket.level + tokens)

    def level(self, key: str) -> float:
        return self._bucket(key).level
