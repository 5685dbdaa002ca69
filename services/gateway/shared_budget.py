"""Per-API-key token buckets shared by every gateway replica through the store.

The same bucket as services/gateway/budget.py, kept in one store hash per key and updated by
one Lua script, so a charge is atomic across gateways and refills by the store's own clock
(gateways' clocks may disagree). A bucket left alone until full is the same as no bucket,
so its key expires then. If the store cannot be reached, the gateway falls back to its own
local buckets (budget.py) rather than refusing every request.
"""

from __future__ import annotations

import math

import redis.asyncio as aioredis

from ..common import keys
from .budget import Charge

# KEYS[1] bucket; ARGV: rate (tokens/s), burst, cost (< 0: refund), ttl_ms. Returns {ok, level}.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local level = tonumber(redis.call('HGET', KEYS[1], 'level'))
local updated = tonumber(redis.call('HGET', KEYS[1], 'updated'))
if level == nil or updated == nil then level = burst; updated = now end
level = math.min(burst, level + math.max(0, now - updated) * rate)
local ok = 0
if cost <= 0 then level = math.min(burst, level - cost); ok = 1
elseif level >= cost then level = level - cost; ok = 1 end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'updated', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {ok, tostring(level)}
"""


class SharedBudgets:
    def __init__(self, store: aioredis.Redis, prefix: str, tokens_per_s: float, burst_tokens: float):
        self.store = store
        self.prefix = prefix
        self.rate = tokens_per_s
        self.burst = burst_tokens
        # empty -> full takes burst / rate; after that the stored bucket says nothing new
        self._ttl_ms = max(1000, math.ceil(burst_tokens / tokens_per_s * 1000))
        self._script = store.register_script(_SCRIPT)

    async def _run(self, key: str, cost: float) -> tuple[bool, float]:
        ok, level = await self._script(keys=[keys.key_budget(self.prefix, key)],
                                       args=[self.rate, self.burst, cost, self._ttl_ms])
        return bool(ok), float(level)

    async def charge(self, key: str, tokens: int) -> Charge:
        ok, level = await self._run(key, tokens)
        return Charge(True) if ok else Charge(False, (tokens - level) / self.rate)

    async def refund(self, key: str, tokens: int) -> None:
        if tokens > 0:
            await self._run(key, -tokens)

    async def level(self, key: str) -> float:
        return (await self._run(key, 0))[1]
