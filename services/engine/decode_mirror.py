"""A contiguous copy of the decode rows' K/V, kept from one step to the next.

Without a paged-attention kernel (CPU), attending over paged blocks means gathering every
decode row's blocks into a contiguous buffer, every layer, every step: a copy of the whole
batch's KV, as costly as the attention itself. While the decoding sequences stay the same
from one step to the next (the steady state of continuous batching), last step's gathered
rows already hold every key but the newest one. The mirror keeps them and appends each
step's new K/V; it gathers from the pool only rows that are new or changed, and rebuilds
when its shape no longer fits. The paged pool stays the source of truth (prefix sharing,
handoff, preemption all work on blocks); the mirror is a cache of it for one batch.

A row is reused only if it holds the same sequence (`SeqWork.seq_id`, unique for the
sequence's life in its engine) at the same batch row, and that sequence decoded the
previous step (its start is exactly the mirror's next position). Any step without decode
rows forgets every row.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .batch import AttentionGroup
from .kv_cache import PagedKvCache

MARGIN_BLOCKS = 8  # room to grow before a rebuild: one every MARGIN_BLOCKS * block_size steps


@dataclass
class MirrorStep:
    """What a step does to the mirror; built once on the host, used by every layer."""

    fill: tuple[int, int] | None  # rows [lo, hi) gathered from the pool this step
    fill_blocks: torch.Tensor | None  # [(hi - lo) * cap_blocks] pool blocks, padded with block 0
    slots: torch.Tensor  # [B * KVH] long: flat mirror index ((row * KVH + head) * cap + start) of the new K/V
    span: int  # keys attended: the group's width * block_size


class DecodeMirror:
    def __init__(self):
        # per layer [rows, KVH, cap_blocks * block_size, D]: each head's keys contiguous, as
        # attention reads them (the pool's [block, row, KVH, D] order costs SDPA ~30% on CPU)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.seq_ids: tuple[int, ...] = ()
        self.next_pos: list[int] = []  # per row: positions [0, next_pos) are in the mirror
        self.cap_blocks = 0
        self.rows_filled = 0  # rows gathered from the pool so far (steady decode adds none)
        self._cache: weakref.ref | None = None

    def forget(self) -> None:
        self.seq_ids, self.next_pos = (), []

    def plan(self, group: AttentionGroup, cache: PagedKvCache) -> MirrorStep:
        b, bs = group.size, cache.block_size
        keep = 0
        fits = (self._cache is not None and self._cache() is cache and self.k
                and group.width <= self.cap_blocks and b <= self.k[0].shape[0])
        if fits:
            # rows that stay: a prefix of last step's rows, each having decoded last step
            limit = min(b, len(self.seq_ids))
            while (keep < limit and self.seq_ids[keep] == group.seq_ids[keep]
                   and self.next_pos[keep] == group.starts[keep]):
                keep += 1
        else:
            self._allocate(cache, rows=b + max(8, b // 4), cap_blocks=group.width + MARGIN_BLOCKS)
        cap = self.cap_blocks
        fill = fill_blocks = None
        if keep < b:
            fill = (keep, b)
            self.rows_filled += b - keep
            tables = [t + [0] * (cap - len(t)) for t in group.tables[keep:]]
            fill_blocks = torch.tensor(tables, dtype=torch.long).flatten().to(cache.device)
        kvh = cache.k[0].shape[2]
        slots = torch.tensor([(r * kvh + h) * cap * bs + s for r, s in enumerate(group.starts) for h in range(kvh)],
                             dtype=torch.long)
        self.seq_ids = group.seq_ids
        self.next_pos = [s + 1 for s in group.starts]
        return MirrorStep(fill, fill_blocks, slots.to(cache.device), group.width * bs)

    def _allocate(self, cache: PagedKvCache, rows: int, cap_blocks: int) -> None:
        kvh, d = cache.k[0].shape[2:]
        shape = (rows, kvh, cap_blocks * cache.block_size, d)
        self.k = self.v = []  # let the old buffers go before taking new ones
        self.k = [torch.empty(shape, dtype=cache.dtype, device=cache.device) for _ in cache.k]
        self.v = [torch.empty(shape, dtype=cache.dtype, device=cache.device) for _ in cache.v]
        self.cap_blocks = cap_blocks
        self._cache = weakref.ref(cache)
        self.forget()

    def update(self, layer: int, step: MirrorStep, k_cache: torch.Tensor, v_cache: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bring one layer's rows up to date (after the step's new K/V went into the pool) and
        return keys, values [B, KVH, span, D] as views. k, v [B, KVH, D]: the rows' new K/V."""
        b, kvh, d = k.shape
        for mirror, cache, new in ((self.k[layer], k_cache, k), (self.v[layer], v_cache, v)):
            if step.fill is not None:
                lo, hi = step.fill
                rows = cache.index_select(0, step.fill_blocks)  # [n * cap_blocks, block_size, KVH, D]
                mirror[lo:hi].copy_(rows.view(hi - lo, -1, kvh, d).transpose(1, 2))
            mirror.view(-1, d).index_copy_(0, step.slots, new.reshape(b * kvh, d))
        return self.k[layer][:b, :, : step.span], self.v[layer][:b, :, : step.span]
