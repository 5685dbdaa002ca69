"""The tuning table: merging observations, share lookup, capacity, JSON and the store."""

from __future__ import annotations

import uuid

import pytest

from services.common import keys
from services.common.store import connect
from services.tuner.table import ProfilePoint, TuningTable


def point(share: float, batch: int, thr: float, p95: float | None, **kw) -> ProfilePoint:
    fields = dict(model="m", stage="decode", device="H100", share=share,
                  config={"max_batch_size": batch, "max_concurrency": batch, "prefill_chunk_size": 0},
                  throughput_tokens_per_s=thr, latency_p50_ms=None if p95 is None else p95 * 0.8, latency_p95_ms=p95)
    fields.update(kw)
    return ProfilePoint(**fields)


def grid_table() -> TuningTable:
    table = TuningTable()
    for share, caps in ((0.25, (400.0, 900.0)), (0.5, (800.0, 1600.0)), (1.0, (1000.0, 3000.0))):
        table.add(point(share, 8, caps[0], 10.0))
        table.add(point(share, 64, caps[1], 20.0))
    return table


def test_online_observation_merges_by_sample_weight_and_keeps_known_fields() -> None:
    table = TuningTable()
    table.add(point(0.5, 8, 1000.0, 10.0, samples=30, updated_at=5.0))
    table.add(point(0.5, 8, 700.0, 16.0, samples=10, source="online", latency_p50_ms=None, updated_at=9.0))
    assert table.version == 2
    [merged] = table.points("m", "decode", "H100", 0.5)
    assert merged.throughput_tokens_per_s == pytest.approx(925.0)
    assert merged.latency_p95_ms == pytest.approx(11.5)
    assert merged.latency_p50_ms == pytest.approx(8.0)  # the online side did not know p50
    assert (merged.samples, merged.source, merged.updated_at) == (40, "profile", 9.0)


def test_profile_point_replaces_and_other_configs_are_separate() -> None:
    table = TuningTable()
    table.add(point(0.5, 8, 1000.0, 10.0, samples=30))
    table.add(point(0.5, 8, 1200.0, 9.0, samples=5))
    table.add(point(0.5, 16, 1800.0, 14.0))
    rows = sorted(table.points("m", "decode", "H100", 0.5), key=lambda p: p.batch)
    assert [(p.batch, p.throughput_tokens_per_s, p.samples) for p in rows] == [(8, 1200.0, 5), (16, 1800.0, 1)]
    assert table.version == 3
    assert table.points("m", "prefill", "H100", 0.5) == []


def test_invalid_points_are_rejected() -> None:
    with pytest.raises(ValueError, match="share"):
        point(0.0, 8, 1.0, 1.0)
    with pytest.raises(ValueError, match="stage"):
        point(0.5, 8, 1.0, 1.0, stage="train")


def test_nearest_share_is_the_largest_profiled_below_else_the_smallest() -> None:
    table = grid_table()
    assert table.shares("m", "decode", "H100") == [0.25, 0.5, 1.0]
    assert table.nearest_share("m", "decode", "H100", 0.75) == 0.5
    assert table.nearest_share("m", "decode", "H100", 0.5) == 0.5
    assert table.nearest_share("m", "decode", "H100", 1.0) == 1.0
    assert table.nearest_share("m", "decode", "H100", 0.1) == 0.25
    assert table.nearest_share("m", "decode", "cpu", 0.5) is None


def test_capacity_meets_slo_and_interpolates_between_shares() -> None:
    table = grid_table()
    assert table.capacity_tokens_per_s("m", "decode", "H100", 0.5, 25.0) == 1600.0
    assert table.capacity_tokens_per_s("m", "decode", "H100", 0.5, 15.0) == 800.0  # batch 64 misses the SLO
    assert table.capacity_tokens_per_s("m", "decode", "H100", 0.75, 25.0) == pytest.approx(2300.0)
    assert table.capacity_tokens_per_s("m", "decode", "H100", 0.125, 25.0) == pytest.approx(450.0)
    assert table.capacity_tokens_per_s("m", "decode", "H100", 1.0, 25.0) == 3000.0
    assert table.capacity_tokens_per_s("m", "decode", "H100", 0.5, 5.0) is None
    assert table.capacity_tokens_per_s("m", "prefill", "H100", 0.5, 25.0) is None


def test_json_is_stable_and_round_trips_exactly() -> None:
    a = grid_table()
    a.add(point(0.3, 4, 0.1 + 0.2, 1 / 3, source="online", updated_at=1_700_000_000.123456))
    b = TuningTable()
    for share in (0.3, 1.0, 0.25, 0.5):  # same points, another order
        for p in reversed(a.points("m", "decode", "H100", share)):
            b.add(p)
    b.version = a.version
    assert a.to_json() == b.to_json()
    again = TuningTable.from_json(a.to_json())
    assert again.to_json() == a.to_json()
    assert again.version == a.version
    assert again.points("m", "decode", "H100", 0.3) == a.points("m", "decode", "H100", 0.3)


@pytest.fixture
async def store(store_url):
    client = connect(store_url)
    yield client
    await client.aclose()


async def test_save_and_load_refuse_to_overwrite_a_newer_table(store) -> None:
    prefix = f"test-tuner-{uuid.uuid4().hex}"
    assert (await TuningTable.load(store, prefix)).version == 0
    mine = grid_table()
    stale = TuningTable.from_json(mine.to_json())
    assert await mine.save(store, prefix)
    loaded = await TuningTable.load(store, prefix)
    assert loaded.to_json() == mine.to_json()

    loaded.add(point(1.0, 128, 4000.0, 30.0, source="online"))
    assert await loaded.save(store, prefix)
    assert not await stale.save(store, prefix)  # older: refused
    stale.add(point(0.25, 128, 1.0, 99.0))
    assert stale.version == loaded.version
    assert not await stale.save(store, prefix)  # same version, different table: refused
    assert await loaded.save(store, prefix)  # the same table again is a no-op that succeeds
    stored = await TuningTable.load(store, prefix)
    assert stored.to_json() == loaded.to_json()
    assert int(await store.hget(keys.tuning_table(prefix), "version")) == loaded.version
    await store.delete(keys.tuning_table(prefix))
