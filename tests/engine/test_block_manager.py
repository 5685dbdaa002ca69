"""Paged KV bookkeeping (services/engine/block_manager.py): pure Python, no torch."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.engine.block_manager import BlockManager, blocks_for_budget, blocks_for_tokens

BS = 4


def test_sizing_from_budget():
    assert blocks_for_budget(10_000, 1024) == 9
    assert blocks_for_budget(100, 1024) == 0
    assert [blocks_for_tokens(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError):
        BlockManager(0, 16)


def test_allocate_grow_free_accounting():
    m = BlockManager(8, BS)
    assert m.allocate("a", list(range(10))) == 0  # nothing cached yet
    assert len(m.block_table("a")) == 3 and m.num_free_blocks == 5
    assert m.grow("a", 12) and len(m.block_table("a")) == 3  # still fits in the partly filled block
    assert m.grow("a", 13) and len(m.block_table("a")) == 4
    assert m.allocate("b", list(range(100, 117))) is None  # 17 tokens: 5 blocks, only 4 free
    m.check()
    m.free("a")
    assert m.num_free_blocks == 8 and not m.has("a")


def test_allocate_is_all_or_nothing():
    m = BlockManager(8, BS)
    m.allocate("a", list(range(13)))  # 4 blocks
    assert m.allocate("b", list(range(100, 117))) is None  # needs 5 of the 4 left
    assert not m.has("b") and m.num_free_blocks == 4
    assert m.allocate("b", list(range(100, 108)), reserve=2) == 0  # 2 blocks, 2 stay free
    assert m.allocate("c", list(range(200, 208)), reserve=1) is None  # would leave 0 < 1
    assert not m.grow("a", 4 * BS + 3 * BS)  # 3 more blocks, 2 free: refused, nothing taken
    assert len(m.block_table("a")) == 4 and m.num_free_blocks == 2
    m.check()
    m.free("a")
    m.free("b")
    assert m.num_free_blocks == 8
    m.check()


def test_at_most_one_partly_filled_block_per_sequence():
    m = BlockManager(64, BS)
    for i, n in enumerate([1, 4, 5, 9, 16, 17]):
        m.allocate(i, list(range(n)))
        assert m.capacity(i) - n < BS  # the slack is less than one block
        for extra in range(1, 9):
            assert m.grow(i, n + extra)
            assert m.capacity(i) - (n + extra) < BS
    m.check()


def test_prefix_blocks_are_shared_and_reference_counted():
    m = BlockManager(16, BS)
    system = list(range(50, 62))  # 3 full blocks
    a = system + [1, 2]
    assert m.allocate("a", a) == 0
    m.commit("a", a, len(a))  # a's KV is computed: its 3 full blocks join the prefix cache
    b = system + [7, 8, 9]
    assert m.allocate("b", b) == 12  # b reuses all three
    ta, tb = m.block_table("a"), m.block_table("b")
    assert ta[:3] == tb[:3] and ta[3] != tb[3]
    assert [m.ref_count(x) for x in ta[:3]] == [2, 2, 2] and m.ref_count(ta[3]) == 1
    assert m.prefix_hits == 3
    # a diverging middle block stops the match there (the chain hashes the whole prefix)
    c = system[:4] + [0] * 4 + system[8:] + [5]
    assert m.allocate("c", c) == 4
    assert m.block_table("c")[0] == ta[0] and m.block_table("c")[1] != ta[1]
    m.free("a")
    assert [m.ref_count(x) for x in ta[:3]] == [2, 1, 1]
    m.check()


def test_whole_prompt_cached_still_computes_the_last_token():
    m = BlockManager(8, BS)
    p = list(range(8))
    m.allocate("a", p)
    m.commit("a", p, 8)
    assert m.allocate("b", p) == 4  # the second block is recomputed to get logits for token 7
    assert m.block_table("b")[1] != m.block_table("a")[1]
    m.check()


def test_freed_prefix_stays_cached_until_the_pool_needs_it():
    m = BlockManager(4, BS)
    p = list(range(9))
    m.allocate("a", p)  # 3 blocks
    m.commit("a", p, 9)
    m.free("a")
    assert m.num_free_blocks == 4  # cached blocks with no reader count as free
    assert m.allocate("b", p) == 8  # and are found again
    m.free("b")
    # an unrelated sequence needing the whole pool evicts them
    q = list(range(100, 116))
    assert m.allocate("c", q) == 0
    m.check()
    m.free("c")
    assert m.allocate("d", p) == 0  # gone
    m.check()


def test_eviction_is_least_recently_freed_first():
    m = BlockManager(4, BS)
    x, y = list(range(5)), list(range(100, 105))
    for name, toks in (("x", x), ("y", y)):
        m.allocate(name, toks)
        m.commit(name, toks, 5)
    m.free("x")  # x's full block freed first
    m.free("y")
    m.allocate("z", list(range(200, 209)))  # 3 blocks: 2 never-registered + 1 evicted
    m.free("z")
    assert m.allocate("y2", y) == 4  # y's block survived; x's went first
    assert m.allocate("x2", x) == 0
    m.check()


def test_double_allocate_raises():
    m = BlockManager(4, BS)
    m.allocate("a", [1])
    with pytest.raises(ValueError):
        m.allocate("a", [1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "grow", "commit", "free"]), st.integers(0, 7), st.integers(1, 20)), max_size=60))
def test_random_operations_keep_accounting(ops):
    """Reference counts match the tables, free + used = total, <= 1 partly filled block each,
    and a shared block is only ever shared between sequences with the same tokens up to it."""
    m = BlockManager(12, BS)
    tokens: dict[int, list[int]] = {}
    for op, who, n in ops:
        if op == "alloc" and who not in tokens:
            toks = [who % 2] * n  # two families of prompts that share prefixes
            if m.allocate(who, toks) is not None:
                tokens[who] = toks
        elif op == "grow" and who in tokens:
            if m.grow(who, len(tokens[who]) + n):
                tokens[who] += [who % 2] * n
        elif op == "commit" and who in tokens:
            m.commit(who, tokens[who], len(tokens[who]))
        elif op == "free" and who in tokens:
            m.free(who)
            del tokens[who]
        m.check()
        assert m.num_free_blocks + m.num_used_blocks == 12
        for owner, toks in tokens.items():
            assert 0 <= m.capacity(owner) - len(toks) < BS
        owners_of: dict[int, list[int]] = {}
        for owner in tokens:
            for i, b in enumerate(m.block_table(owner)):
                owners_of.setdefault(b, []).append((owner, i))
        for b, users in owners_of.items():
            if len(users) > 1:
                prefixes = {tuple(tokens[o][: (i + 1) * BS]) for o, i in users}
                assert len(prefixes) == 1, f"block {b} shared by different prefixes"
