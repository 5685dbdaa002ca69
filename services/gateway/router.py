"""Worker choice: power of two choices on queued tokens, then load and KV headroom (pure).

Reports are up to a second old, so between reports the gateway's own count of open
requests per worker breaks ties; without it a burst would follow one stale report.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence

from ..common.load_report import LoadReport


def load_key(worker: LoadReport, open_requests: Mapping[str, int]) -> tuple[int, int, int]:
    return (worker.queued_tokens, open_requests.get(worker.worker_id, 0), -worker.kv_free_tokens)


def pick(
    workers: Sequence[LoadReport],
    open_requests: Mapping[str, int],
    exclude: Collection[str] = (),
    rng: random.Random | None = None,
) -> LoadReport | None:
    """Sample two live, non-draining workers and keep the less loaded; None if none is left."""
    live = [w for w in workers if not w.draining and w.worker_id not in exclude]
    if not live:
        return None
    if len(live) == 1:
        return live[0]
    a, b = (rng or random).sample(live, 2)
    return min((a, b), key=lambda w: load_key(w, open_requests))
