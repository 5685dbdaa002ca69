"""`elastune experts placement`: show the placement table and the per-expert token counts, copy an
expert into a group, or let the counters pick the copies (replicate_hottest until balanced).

Every change is a new placement version; workers pick it up within their refresh interval and
servers load an expert on its first call, so no request fails while a change spreads.
"""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from ..common import keys
from .placement import Placement, group_rates, replicate_hottest
from .placement_store import read_placement, write_placement


async def expert_counts(store: aioredis.Redis, prefix: str) -> dict[int, int]:
    """Tokens computed per expert so far (keys.expert_tokens)."""
    return {int(k): int(v) for k, v in (await store.hgetall(keys.expert_tokens(prefix))).items()}


async def update_placement(
    store: aioredis.Redis, prefix: str, replicate: list[tuple[int, str]] = (), auto: bool = False,
    imbalance: float = 1.1,
) -> dict:
    """Apply the copies asked for (expert, group), then with `auto` those the counters call for;
    returns what the table looks like now, with the per-expert counts and per-group load."""
    placement = await read_placement(store, prefix)
    if placement is None:
        raise LookupError(f"no expert placement under prefix {prefix!r}: start an experts server first")
    counts = await expert_counts(store, prefix)
    changed: Placement = placement
    for expert, group in replicate:
        changed = changed.replicate(expert, group)
    if auto:
        rates = {e: float(counts.get(e, 0)) for e in range(placement.num_experts)}
        while (better := replicate_hottest(rates, changed, imbalance)) is not None:
            changed = better
    if changed.version != placement.version and not await write_placement(store, prefix, changed):
        raise RuntimeError("the placement changed meanwhile; run the command again")
    shares = group_rates({e: float(n) for e, n in counts.items()}, changed)
    total = sum(shares.values()) or 1.0
    return {"version": changed.version, "groups": {g: list(e) for g, e in sorted(changed.groups.items())},
            "expert_tokens": counts, "group_share": {g: round(v / total, 3) for g, v in sorted(shares.items())}}


def main(store_url: str, prefix: str, replicate: list[str], auto: bool) -> int:
    import asyncio
    import sys

    from ..common.store import connect

    pairs = []
    for item in replicate:
        expert, _, group = item.partition(":")
        if not expert.isdigit() or not group:
            print(f"elastune: --replicate {item!r}: want EXPERT:GROUP, e.g. 0:g1", file=sys.stderr)
            return 2
        pairs.append((int(expert), group))

    async def run() -> dict:
        store = connect(store_url)
        try:
            return await update_placement(store, prefix, pairs, auto)
        finally:
            await store.aclose()

    try:
        print(json.dumps(asyncio.run(run()), indent=2))
    except (LookupError, ValueError, RuntimeError) as exc:
        print(f"elastune: {exc}", file=sys.stderr)
        return 1
    return 0
