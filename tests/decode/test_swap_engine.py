"""DecodeEngine with a swap space, offline on the tiny model: preemption by swap (and the
fall back to recompute when the swap space is full) keeps greedy tokens equal to the
unpreempted run and to transformers, the KV really goes through the host copy, the metric
counts the two modes apart, and the decode mirror can be switched off without changing a
token, nor serve a swapped-in sequence rows it cached before the swap."""

from __future__ import annotations

import types

from prometheus_client import CollectorRegistry, generate_latest

from services.decode.engine import DecodeEngine
from services.decode.metrics import _EngineCollector
from services.engine.kv_cache import PagedKvCache
from tests.decode.test_engine import BS, _prompts, _run, _run_admitting_when_possible, expected, runner  # noqa: F401

POOL_BLOCKS = 24  # 12 prompts of up to 45 tokens + 12 outputs in 24 blocks of 8: preemption is certain


def _engine(runner, swap_blocks: int, mirror: bool = True, min_tokens: int = 1, blocks: int = POOL_BLOCKS):
    block_bytes = PagedKvCache.block_bytes(runner.config, BS, runner.dtype)
    e = DecodeEngine(runner, 64, 64, None, kv_budget_bytes=blocks * block_bytes, block_size=BS, token_budget=64,
                     swap_bytes=swap_blocks * block_bytes, swap_min_tokens=min_tokens, mirror=mirror)
    e.watermark_blocks = 0
    e.scheduler.swap_in_reserve = 0
    return e


def _count_copies(engine: DecodeEngine) -> dict[str, int]:
    """Wrap the host cache's copies (still run) to count the blocks that go through them."""
    counts = {"out": 0, "in": 0}
    host = engine.host_cache
    out, back = host.swap_out, host.swap_in

    def swap_out(cache, device_blocks, host_blocks):
        counts["out"] += len(device_blocks)
        out(cache, device_blocks, host_blocks)

    def swap_in(cache, host_blocks, device_blocks):
        counts["in"] += len(device_blocks)
        back(cache, host_blocks, device_blocks)

    host.swap_out, host.swap_in = swap_out, swap_in
    return counts


def test_swap_preemption_keeps_greedy_outputs(runner, expected):
    engine = _engine(runner, swap_blocks=64)
    copies = _count_copies(engine)
    got = _run_admitting_when_possible(engine, _prompts(runner.config.vocab_size))
    assert got == expected[0]  # transformers, which is also what the unpreempted run gives (test_engine.py)
    s = engine.scheduler
    assert s.swaps_out > 0 and s.swaps_in == s.swaps_out and s.recomputes == 0
    assert copies["out"] > 0 and copies["in"] > 0  # the KV went to the host and back, not recomputed
    assert engine.swap.num_used_blocks == 0 and not s.swapped
    engine.swap.check()


def test_swapped_kv_is_what_comes_back(runner, expected):
    """Swap-in must copy the host KV, not leave whatever the freed device blocks hold by now:
    scribble over every device block a swap-out frees and the tokens still match."""
    engine = _engine(runner, swap_blocks=64)
    host = engine.host_cache
    out = host.swap_out

    def swap_out_then_scribble(cache, device_blocks, host_blocks):
        out(cache, device_blocks, host_blocks)
        for b in device_blocks:
            if b in engine.kv._free:  # neither read by another sequence nor a cached prefix: garbage now
                for t in cache.k + cache.v:
                    t[b].fill_(1e3)

    host.swap_out = swap_out_then_scribble
    assert _run_admitting_when_possible(engine, _prompts(runner.config.vocab_size)) == expected[0]
    assert engine.scheduler.swaps_in > 0


def test_full_swap_space_falls_back_to_recompute(runner, expected):
    engine = _engine(runner, swap_blocks=5)  # room for one short victim at a time
    got = _run_admitting_when_possible(engine, _prompts(runner.config.vocab_size))
    assert got == expected[0]
    s = engine.scheduler
    assert s.swaps_out > 0 and s.recomputes > 0 and s.preemptions == s.swaps_out + s.recomputes


def test_short_sequences_recompute_below_swap_min_tokens(runner, expected):
    engine = _engine(runner, swap_blocks=64, min_tokens=10_000)
    assert _run_admitting_when_possible(engine, _prompts(runner.config.vocab_size)) == expected[0]
    assert engine.scheduler.swaps_out == 0 and engine.scheduler.recomputes > 0


def test_metric_counts_swaps_and_recomputes_apart(runner):
    engine = _engine(runner, swap_blocks=5)
    _run_admitting_when_possible(engine, _prompts(runner.config.vocab_size))
    worker = types.SimpleNamespace(engine=engine, runtime=types.SimpleNamespace(max_batch_size=64))
    registry = CollectorRegistry()
    registry.register(_EngineCollector(worker))
    text = generate_latest(registry).decode()
    s = engine.scheduler
    assert f'elastune_decode_preemptions_total{{mode="swap"}} {float(s.swaps_out)}' in text
    assert f'elastune_decode_preemptions_total{{mode="recompute"}} {float(s.recomputes)}' in text


def test_mirror_switch_gives_identical_tokens(runner, expected):
    prompts = _prompts(runner.config.vocab_size)
    model = runner.model
    off = _engine(runner, swap_blocks=0, mirror=False, blocks=256)
    filled = model.mirror.rows_filled
    model.mirror.forget()
    assert _run(off, prompts) == expected[0]
    assert model.mirror.rows_filled == filled and model.mirror.seq_ids == ()  # never used
    on = _engine(runner, swap_blocks=0, mirror=True, blocks=256)
    assert _run(on, prompts) == expected[0]
    assert model.mirror.rows_filled > filled  # and this time it was


def test_swap_with_mirror_on_and_off_and_a_swapped_in_sequence_gets_a_fresh_mirror_id(runner, expected):
    prompts = _prompts(runner.config.vocab_size)
    engine = _engine(runner, swap_blocks=64, mirror=True)
    ids_before_swap: dict[str, int] = {}
    ids_after_swap: dict[str, int] = {}
    step = engine.step

    def step_and_record():  # the id a sequence had when it was swapped out vs. the one it runs with after
        swapped = {s.request_id: engine._seq_ids.get(s) for s in engine.scheduler.running}
        did = step()
        for s in engine.scheduler.swapped:
            if swapped.get(s.request_id) is not None:
                ids_before_swap[s.request_id] = swapped[s.request_id]
                assert s not in engine._seq_ids  # dropped at the swap-out
        for s in engine.scheduler.running:
            if s.request_id in ids_before_swap and engine._seq_ids.get(s) is not None:
                ids_after_swap[s.request_id] = engine._seq_ids[s]
        return did

    engine.step = step_and_record
    assert _run_admitting_when_possible(engine, prompts) == expected[0]
    assert ids_before_swap, "something should have been swapped out while it had a mirror id"
    assert ids_after_swap and all(ids_after_swap[r] > ids_before_swap[r] for r in ids_after_swap)
    off = _engine(runner, swap_blocks=64, mirror=False)
    assert _run_admitting_when_possible(off, prompts) == expected[0]
    assert off.scheduler.swaps_out > 0
