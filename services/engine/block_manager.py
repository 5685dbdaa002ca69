"""Paged KV bookkeeping: which cache blocks each sequence owns, and prefix sharing.

Pure Python, no torch; the tensors live in `kv_cache.PagedKvCache`. A sequence's KV for
token positions [0, n) sits in its block table: position p is row p % block_size of block
table[p // block_size]. Every block but a sequence's last is full, so a sequence holds at
most one partly filled block.

Prefix sharing: a full block whose KV has been computed is registered under the hash chain
of its tokens (the hash of the previous block's key and this block's tokens), so a later
sequence with the same leading tokens maps the same blocks instead of recomputing them.
Shared blocks are reference counted. A registered block nobody references stays cached and
can be matched again until the pool needs it back (least recently freed goes first).

Thread-safe: the decode worker's event loop reserves and frees, its engine thread grows
tables and commits computed blocks.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def blocks_for_budget(budget_bytes: int, block_bytes: int) -> int:
    """How many blocks of block_bytes a memory budget holds."""
    return max(int(budget_bytes) // block_bytes, 0)


@dataclass
class _Block:
    ref: int = 0
    key: int | None = None  # prefix-cache key once the block is full and computed
    tokens: tuple[int, ...] = ()  # its tokens, compared on a key match so a hash collision cannot alias


@dataclass
class _Table:
    blocks: list[int] = field(default_factory=list)
    committed: int = 0  # leading blocks already registered in the prefix cache
    last_key: int | None = None  # key of block committed - 1


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free = list(range(num_blocks - 1, -1, -1))  # never registered; pop() gives the lowest id
        self._cached: dict[int, int] = {}  # prefix key -> block id
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, ref 0, least recent first
        self.evictions = 0  # cached prefix blocks reused for other data (a metric)
        self._tables: dict[Hashable, _Table] = {}
        self._lock = threading.RLock()
        self.prefix_hits = 0  # blocks matched in the prefix cache, for the load report

    # ---- queries ----

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never used, or cached with no reader."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def block_table(self, owner: Hashable) -> list[int]:
        return self._tables[owner].blocks

    def has(self, owner: Hashable) -> bool:
        return owner in self._tables

    def ref_count(self, block: int) -> int:
        return self._blocks[block].ref

    def capacity(self, owner: Hashable) -> int:
        """Tokens the owner's blocks can hold."""
        return len(self._tables[owner].blocks) * self.block_size

    # ---- allocation ----

    def allocate(self, owner: Hashable, tokens: Sequence[int], num_tokens: int | None = None, reserve: int = 0) -> int | None:
        """Give `owner` a block table for `num_tokens` (default len(tokens)) positions, reusing
        cached blocks for the longest prefix of full token blocks found in the cache.

        At least one token is always left to compute, so the caller gets logits for the last
        one. Returns the number of leading tokens whose KV is already there, or None (and
        changes nothing) when fewer than `reserve` blocks would stay free afterwards.
        """
        with self._lock:
            if owner in self._tables:
                raise ValueError(f"{owner!r} already has a block table")
            n = len(tokens) if num_tokens is None else num_tokens
            bs = self.block_size
            hits: list[int] = []
            key = None
            for i in range(max(len(tokens) - 1, 0) // bs):
                chunk = tuple(tokens[i * bs : (i + 1) * bs])
                key = hash((key, chunk))
                block = self._cached.get(key)
                if block is None or self._blocks[block].tokens != chunk:
                    break
                hits.append(block)
            needed = blocks_for_tokens(n, bs) - len(hits)
            # hit blocks with no reader come out of the evictable set, so they count against it
            revived = sum(1 for b in hits if self._blocks[b].ref == 0)
            if self.num_free_blocks - revived - max(needed, 0) < reserve:
                return None
            table = _Table()
            for b in hits:
                self._take(b)
                table.blocks.append(b)
            table.committed = len(hits)
            table.last_key = self._blocks[hits[-1]].key if hits else None
            self._tables[owner] = table
            self._grow(table, n)
            self.prefix_hits += len(hits)
            return len(hits) * bs

    def grow(self, owner: Hashable, num_tokens: int) -> bool:
        """Make room for positions [0, num_tokens); False (nothing taken) if the pool is short."""
        with self._lock:
            table = self._tables[owner]
            if blocks_for_tokens(num_tokens, self.block_size) - len(table.blocks) > self.num_free_blocks:
                return False
            self._grow(table, num_tokens)
            return True

    def commit(self, owner: Hashable, tokens: Sequence[int], num_computed: int) -> None:
        """Register the owner's full blocks whose KV is now computed (positions < num_computed)
        in the prefix cache. A block whose key is already cached under another block stays
        private: the first one keeps serving matches."""
        with self._lock:
            table = self._tables[owner]
            bs = self.block_size
            while (table.committed + 1) * bs <= num_computed:
                i = table.committed
                chunk = tuple(tokens[i * bs : (i + 1) * bs])
                key = hash((table.last_key, chunk))
                block = self._blocks[table.blocks[i]]
                if key not in self._cached and block.key is None:
                    self._cached[key] = table.blocks[i]
                    block.key, block.tokens = key, chunk
                table.last_key = key
                table.committed += 1

    def free(self, owner: Hashable) -> None:
        """Drop the owner's table. Registered blocks stay cached (last ones evicted first)."""
        with self._lock:
            table = self._tables.pop(owner)
            for b in reversed(table.blocks):  # the tail of a chain is the least likely to be shared
                block = self._blocks[b]
                block.ref -= 1
                if block.ref == 0:
                    if block.key is None:
                        self._free.append(b)
                    else:
                        self._evictable[b] = None

    # ---- internals (lock held) ----

    def _grow(self, table: _Table, num_tokens: int) -> None:
        while len(table.blocks) * self.block_size < num_tokens:
            table.blocks.append(self._take_free())

    def _take(self, b: int) -> None:
        block = self._blocks[b]
        if block.ref == 0:
            self._evictable.pop(b, None)
        block.ref += 1

    def _take_free(self) -> int:
        if self._free:
            b = self._free.pop()
        else:
            b, _ = self._evictable.popitem(last=False)  # least recently freed cached block
            self.evictions += 1
            block = self._blocks[b]
            del self._cached[block.key]
            block.key, block.tokens = None, ()
        self._blocks[b].ref = 1
        return b

    def check(self) -> None:
        """Assert the accounting invariants (tests call this after every operation)."""
        with self._lock:
            refs = [0] * self.num_blocks
            for table in self._tables.values():
                for b in table.blocks:
                    refs[b] += 1
            assert refs == [blk.ref for blk in self._blocks], "reference counts disagree with the tables"
            free = set(self._free)
            assert len(free) == len(self._free) and free.isdisjoint(self._evictable)
            for b, blk in enumerate(self._blocks):
                in_pool = b in free or b in self._evictable
                assert in_pool == (blk.ref == 0), f"block {b}: ref {blk.ref} but in_pool={in_pool}"
                assert (b in free) <= (blk.key is None)
                if blk.key is not None:
                    assert self._cached[blk.key] == b
            assert len(self._cached) == sum(blk.key is not None for blk in self._blocks)
