"""Host swap space bookkeeping (services/engine/swap_space.py): pure Python, no torch."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.engine.swap_space import SwapSpace


def test_allocate_free_and_a_full_space_takes_nothing():
    s = SwapSpace(5, block_size=4)
    assert s.allocate("a", 3) == [0, 1, 2]
    assert s.num_free_blocks == 2 and s.has("a") and s.table("a") == [0, 1, 2]
    assert s.allocate("b", 3) is None  # short: nothing taken
    assert s.num_free_blocks == 2 and not s.has("b")
    assert s.allocate("b", 2) == [3, 4]
    s.free("a")
    assert s.num_free_blocks == 3 and not s.has("a")
    assert s.allocate("c", 3) == [0, 1, 2]  # freed blocks come back lowest first
    s.check()


def test_misuse_is_an_error():
    s = SwapSpace(4, block_size=4)
    s.allocate("a", 1)
    with pytest.raises(ValueError, match="already swapped out"):
        s.allocate("a", 1)
    with pytest.raises(ValueError, match="at least one block"):
        s.allocate("b", 0)
    with pytest.raises(KeyError):
        s.free("b")
    with pytest.raises(ValueError):
        SwapSpace(0, 4)


@settings(max_examples=100, deadline=None)
@given(blocks=st.integers(1, 20), ops=st.lists(st.tuples(st.booleans(), st.integers(0, 9), st.integers(1, 8)), max_size=50))
def test_random_allocations_never_lose_or_share_a_block(blocks, ops):
    s = SwapSpace(blocks, block_size=2)
    held: dict[int, int] = {}
    for alloc, owner, n in ops:
        if alloc and owner not in held:
            table = s.allocate(owner, n)
            assert (table is None) == (n > blocks - sum(held.values()))
            if table is not None:
                held[owner] = n
                assert len(table) == n
        elif not alloc and owner in held:
            s.free(owner)
            del held[owner]
        s.check()
        assert s.num_used_blocks == sum(held.values())
