"""Host swap space bookkeeping: which host blocks hold each swapped-out sequence's KV.

Pure Python, no torch; the tensors live in `host_kv_cache.HostKvCache` (pinned host memory
beside a GPU pool, a second RAM pool beside a CPU one). A swapped-out sequence's host table
holds its computed positions [0, n) in the same layout as a device block table: position p
is row p % block_size of host block table[p // block_size].

Copy-on-swap: swapping out copies EVERY block holding a computed position to the host,
shared prefix blocks included, and then only drops the sequence's references to its device
blocks (`BlockManager.free`). A block another sequence still reads keeps its reference count
above zero, so it is neither freed nor overwritten; a registered prefix block stays cached.
The host copy is private and complete, so the sequence never depends on a device block it
no longer references. On swap-in it maps again whatever prefix blocks are still cached on
the device (sharing restored, nothing copied for them) and copies the rest back from its
host copy into freshly allocated blocks.

Engine thread only (the scheduler plans, the engine copies): no lock.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SwapCopy:
    """Blocks to copy for one sequence: device_blocks[i] <-> host_blocks[i]."""

    seq: Any
    device_blocks: tuple[int, ...]
    host_blocks: tuple[int, ...]


class SwapSpace:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() gives the lowest id
        self._tables: dict[Hashable, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def has(self, owner: Hashable) -> bool:
        return owner in self._tables

    def table(self, owner: Hashable) -> list[int]:
        return self._tables[owner]

    def allocate(self, owner: Hashable, num_blocks: int) -> list[int] | None:
        """Host blocks for `owner`'s KV; None (nothing taken) when the space is short."""
        if owner in self._tables:
            raise ValueError(f"{owner!r} is already swapped out")
        if num_blocks < 1:
            raise ValueError(f"a swap needs at least one block, got {num_blocks}")
        if num_blocks > len(self._free):
            return None
        table = [self._free.pop() for _ in range(num_blocks)]
        self._tables[owner] = table
        return table

    def free(self, owner: Hashable) -> None:
        self._free.extend(reversed(self._tables.pop(owner)))

    def check(self) -> None:
        """Assert the accounting invariants: every block is free or in exactly one table."""
        held = [b for t in self._tables.values() for b in t]
        assert len(held) == len(set(held)), "a host block is in two tables"
        assert set(held).isdisjoint(self._free) and len(set(self._free)) == len(self._free)
        assert sorted(held + self._free) == list(range(self.num_blocks)), "host blocks lost or invented"
