"""Placement tables and the per-step split of tokens among expert groups (pure logic)."""

from __future__ import annotations

import pytest

from services.experts.placement import (
    Placement, Replica, group_rates, least_loaded, replicate_hottest, split_tokens, stage_of, water_fill,
)


def test_even_placement_covers_every_expert_once():
    p = Placement.even(8, 3)
    assert p.groups == {"g0": (0, 1, 2), "g1": (3, 4, 5), "g2": (6, 7)}
    assert all(len(p.groups_of(e)) == 1 for e in range(8))
    assert stage_of("g1") == "experts/g1"


@pytest.mark.parametrize("groups, message", [
    ({"g0": (0, 1, 2)}, "experts [3] are in no group"),
    ({"g0": (0, 1, 1, 2, 3)}, "distinct"),
    ({"g0": (0, 1, 2, 3, 4)}, "in 0..3"),
    ({"G_0": (0, 1, 2, 3)}, "group name"),
])
def test_bad_placements_are_refused(groups, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Placement(4, groups)


def test_replicate_adds_a_copy_and_bumps_the_version():
    p = Placement.even(4, 2)
    q = p.replicate(0, "g1")
    assert q.groups_of(0) == ("g0", "g1") and q.version == p.version + 1
    assert q.replicate(0, "g1") is q  # already there: unchanged
    r = q.replicate(1, "hot")  # a new group
    assert r.groups["hot"] == (1,) and r.groups_of(1) == ("g0", "hot")
    assert Placement.from_json(r.to_json()) == r


def test_water_fill_evens_out_loads():
    assert water_fill(10, [0, 0]) == [5, 5]
    assert water_fill(10, [8, 0]) == [1, 9]  # 9 and 9
    assert water_fill(3, [0, 10, 10]) == [3, 0, 0]
    assert water_fill(7, [2, 2, 9]) == [4, 3, 0]
    assert sum(water_fill(101, [5, 17, 3, 40])) == 101


def test_split_tokens_keeps_single_homed_experts_and_balances_replicas():
    p = Placement.even(4, 2).replicate(0, "g1")  # g0: 0 1, g1: 0 2 3
    plan = split_tokens({0: 30, 1: 10, 2: 4, 3: 6}, p)
    assert plan[1] == {"g0": 10} and plan[2] == {"g1": 4} and plan[3] == {"g1": 6}
    assert sum(plan[0].values()) == 30
    load = {g: sum(s.get(g, 0) for s in plan.values()) for g in p.groups}
    assert load == {"g0": 25, "g1": 25}


def test_group_rates_and_replicating_the_hottest_expert():
    p = Placement.even(8, 4)
    zipf = {e: 100.0 / (e + 1) ** 1.2 for e in range(8)}  # expert 0 hottest
    rates = group_rates(zipf, p)
    assert max(rates, key=rates.get) == "g0"
    q = replicate_hottest(zipf, p)
    assert q is not None and q.groups_of(0) == ("g0", min(("g1", "g2", "g3"), key=rates.get))
    assert max(group_rates(zipf, q).values()) < rates["g0"]
    assert replicate_hottest({e: 1.0 for e in range(8)}, p) is None  # balanced: nothing to do


def test_least_loaded_counts_what_this_caller_sent_since_the_report():
    a, b = Replica("a", "x:1", queued_tokens=4), Replica("b", "x:2", queued_tokens=10)
    assert least_loaded([a, b], {}) is a
    assert least_loaded([a, b], {"a": 7}) is b
    with pytest.raises(ValueError):
        least_loaded([], {})


async def test_placement_command_replicates_by_hand_and_from_the_counters(store_url):
    import uuid

    from services.common import keys
    from services.common.store import connect
    from services.experts.admin import update_placement
    from services.experts.placement_store import ensure_placement, read_placement

    prefix = f"test-{uuid.uuid4().hex[:8]}"
    store = connect(store_url)
    try:
        with pytest.raises(LookupError):
            await update_placement(store, prefix)
        await ensure_placement(store, prefix, Placement.even(8, 4))
        shown = await update_placement(store, prefix, [(5, "g0")])
        assert shown["version"] == 2 and shown["groups"]["g0"] == [0, 1, 5]
        # skewed counters: expert 0 carries most tokens; --auto spreads it over the cold groups
        await store.hset(keys.expert_tokens(prefix), mapping={str(e): int(1000 / (e + 1) ** 1.2) for e in range(8)})
        before = max(group_rates({e: 1000 / (e + 1) ** 1.2 for e in range(8)}, await read_placement(store, prefix)).values())
        shown = await update_placement(store, prefix, auto=True)
        assert shown["version"] > 2 and len([g for g, es in shown["groups"].items() if 0 in es]) >= 2
        assert max(shown["group_share"].values()) * sum(shown["expert_tokens"].values()) < before
    finally:
        await store.aclose()
