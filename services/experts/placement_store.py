"""The placement table in the store: read, create once, update with a newer version only."""

from __future__ import annotations

import redis.asyncio as aioredis

from ..common import keys
from .placement import Placement

# Replace the table only when the new version is higher, atomically (several writers may race).
_UPDATE = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if tonumber(ARGV[1]) <= current then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'table', ARGV[2])
return 1
"""
_CREATE = """
if redis.call('HEXISTS', KEYS[1], 'version') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'table', ARGV[2])
return 1
"""


async def read_placement(store: aioredis.Redis, prefix: str) -> Placement | None:
    raw = await store.hget(keys.expert_placement(prefix), "table")
    return Placement.from_json(raw) if raw is not None else None


async def write_placement(store: aioredis.Redis, prefix: str, placement: Placement) -> bool:
    """Store `placement` if its version is newer than the stored one; False if it was not."""
    done = await store.eval(_UPDATE, 1, keys.expert_placement(prefix), placement.version, placement.to_json())
    return bool(done)


async def ensure_placement(store: aioredis.Redis, prefix: str, default: Placement) -> Placement:
    """The stored placement; `default` is stored first if there is none (the first server wins)."""
    await store.eval(_CREATE, 1, keys.expert_placement(prefix), default.version, default.to_json())
    return await read_placement(store, prefix)
