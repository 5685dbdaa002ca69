"""Slot bookkeeping (SlotPool) and prompt placement (KvCache) in services/engine/kv_cache.py."""

from __future__ import annotations

import threading

import pytest
import torch

from services.engine.kv_cache import KvCache, PagedKvCache, SlotPool, kv_budget_bytes
from services.engine.model_config import ModelConfig


def test_allocate_until_exhausted():
    pool = SlotPool(4, slot_tokens=32)
    got = [pool.allocate() for _ in range(4)]
    assert sorted(got) == [0, 1, 2, 3]
    assert pool.used == 4
    assert pool.allocate() is None
    assert pool.allocate() is None
    assert pool.used == 4
    assert pool.capacity_tokens == 4 * 32


def test_free_returns_capacity():
    pool = SlotPool(3, slot_tokens=8)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    pool.free(b)
    assert pool.used == 2
    assert pool.allocate() == b
    assert pool.allocate() is None
    for s in (a, b, c):
        pool.free(s)
    assert pool.used == 0
    assert sorted(pool.allocate() for _ in range(3)) == [0, 1, 2]


def test_double_free_raises():
    pool = SlotPool(2, slot_tokens=8)
    slot = pool.allocate()
    pool.free(slot)
    with pytest.raises(ValueError):
        pool.free(slot)
    assert pool.used == 0
    with pytest.raises(ValueError):
        pool.free(1)  # never allocated
    assert sorted(pool.allocate() for _ in range(2)) == [0, 1]  # the free list was not corrupted
    assert pool.allocate() is None


@pytest.mark.parametrize("slot", [-1, 2, 100])
def test_out_of_range_free_raises(slot):
    pool = SlotPool(2, slot_tokens=8)
    pool.allocate()
    pool.allocate()
    with pytest.raises(ValueError):
        pool.free(slot)
    assert pool.used == 2
    assert pool.allocate() is None


def test_two_threads_keep_invariants():
    pool = SlotPool(3, slot_tokens=8)
    held: set[int] = set()
    check = threading.Lock()
    errors: list[str] = []
    allocated = [0, 0]

    def worker(n: int) -> None:
        mine: list[int] = []
        for i in range(10_000):
            if len(mine) < 2 and i % 3 != 2:
                slot = pool.allocate()
                if slot is None:
                    continue
                with check:
                    if slot in held or not 0 <= slot < 3:
                        errors.append(f"slot {slot} handed out twice")
                    held.add(slot)
                mine.append(slot)
                allocated[n] += 1
            elif mine:
                slot = mine.pop(0)
                with check:
                    held.discard(slot)
                pool.free(slot)
        for slot in mine:
            with check:
                held.discard(slot)
            pool.free(slot)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert all(a > 1000 for a in allocated)
    assert pool.used == 0
    assert sorted(pool.allocate() for _ in range(3)) == [0, 1, 2]
    assert pool.allocate() is None


def _config() -> ModelConfig:
    return ModelConfig.from_dict({
        "model_type": "llama", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 32,
    })


def test_cache_shape():
    cfg = _config()
    cache = KvCache(cfg, num_slots=4, slot_tokens=10, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert len(cache.k) == len(cache.v) == 3
    for t in cache.k + cache.v:
        assert t.shape == (4, 2, 10, 4)
        assert t.dtype == torch.bfloat16


def test_write_prompt_touches_only_its_slot_and_positions():
    cfg = _config()
    cache = KvCache(cfg, num_slots=4, slot_tokens=10, dtype=torch.float32, device=torch.device("cpu"))
    for t in cache.k + cache.v:
        t.fill_(-7.0)
    before_k = [t.clone() for t in cache.k]
    before_v = [t.clone() for t in cache.v]
    kv = torch.randn(2, 2, 6, 4)
    cache.write_prompt(slot=2, layer=1, kv=kv)
    assert torch.equal(cache.k[1][2, :, :6], kv[0])
    assert torch.equal(cache.v[1][2, :, :6], kv[1])
    # everything else is as it was: other slots, positions >= T, other layers
    expect_k = [t.clone() for t in before_k]
    expect_v = [t.clone() for t in before_v]
    expect_k[1][2, :, :6] = kv[0]
    expect_v[1][2, :, :6] = kv[1]
    for layer in range(3):
        assert torch.equal(cache.k[layer], expect_k[layer]), layer
        assert torch.equal(cache.v[layer], expect_v[layer]), layer
    # a later, shorter prompt in the same slot overwrites only its own prefix
    short = torch.randn(2, 2, 2, 4)
    cache.write_prompt(slot=2, layer=1, kv=short)
    assert torch.equal(cache.k[1][2, :, :2], short[0])
    assert torch.equal(cache.k[1][2, :, 2:6], kv[0][:, 2:])


def test_paged_write_places_positions_by_block_table_and_skips_shared_rows():
    cfg = _config()
    cache = PagedKvCache(cfg, num_blocks=6, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    for t in cache.k + cache.v:
        t.fill_(-7.0)
    table = [4, 1, 3]  # positions 0-3 in block 4, 4-7 in block 1, 8-9 in block 3
    kv = torch.randn(2, 2, 10, 4)  # [2, KVH, T, D]
    cache.write(layer=2, table=table, kv=kv, start=5)  # positions 0-4 are shared prefix rows: untouched
    k = cache.k[2]
    assert torch.equal(k[4], torch.full_like(k[4], -7.0))
    assert torch.equal(k[1, 0], torch.full_like(k[1, 0], -7.0))  # position 4
    assert torch.equal(k[1, 1:].transpose(0, 1), kv[0, :, 5:8])  # positions 5-7
    assert torch.equal(k[3, :2].transpose(0, 1), kv[0, :, 8:10])
    assert torch.equal(cache.v[2][3, :2].transpose(0, 1), kv[1, :, 8:10])
    for other in (0, 2, 5):
        assert torch.equal(k[other], torch.full_like(k[other], -7.0))
    assert all(torch.equal(t, torch.full_like(t, -7.0)) for i, t in enumerate(cache.k) if i != 2)
    cache.write(layer=2, table=table, kv=kv)  # now the whole prompt
    assert torch.equal(cache.read(2, table, 10), kv)  # read gives back [2, KVH, T, D], contiguous
    assert cache.read(2, table, 10).is_contiguous()


def test_block_bytes_and_budget():
    cfg = _config()
    per_token = cfg.kv_bytes_per_token(2)  # 2 * layers * KVH * D * 2 bytes
    assert PagedKvCache.block_bytes(cfg, 16, torch.bfloat16) == 16 * per_token == 16 * 2 * 3 * 2 * 4 * 2
    assert kv_budget_bytes(torch.device("cpu"), 12345, 0.5) == 12345


@pytest.mark.parametrize("start", [0, 3, 9])
def test_paged_write_by_slice_runs_equals_index_copy(monkeypatch, start):
    """Consecutive blocks are written as one slice copy; many runs fall back to index_copy_."""
    from services.engine import kv_cache

    cfg = _config()
    table = [2, 3, 4, 9, 10, 0, 6]  # runs: blocks 2-4, 9-10, 0, 6
    kv = torch.randn(2, 2, 26, 4)
    probe = PagedKvCache(cfg, num_blocks=12, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    assert [n for _, _, n in probe._runs(table, start, 26)] == [12 - start, 8, 4, 2]
    caches = []
    for max_runs in (8, 1):
        monkeypatch.setattr(kv_cache, "MAX_COPY_RUNS", max_runs)
        cache = PagedKvCache(cfg, num_blocks=12, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
        cache.write(layer=1, table=table, kv=kv, start=start)
        caches.append(cache)
    assert all(torch.equal(a, b) for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v))
    assert torch.equal(caches[0].read(1, table, 26)[:, :, start:], kv[:, :, start:])
