"""DecodeEngine with a swap space, on the tiny model: swap preemption keeps greedy tokens
equal to transformers' (and to the unpreempted run), shared prefixes survive it, a full
swap space falls back to recompute, the decode mirror can be switched off without changing
a token and never serves a swapped-in sequence KV it cached before the swap, and the
worker's metrics count the two preemption modes apart."""

from __future__ import annotations

import math

import pytest
import torch
from prometheus_client import generate_latest

from services.common.config import from_env
from services.decode.config import DecodeConfig
from services.decode.engine import DecodeEngine
from services.decode.server import DecodeWorker
from services.engine.kv_cache import PagedKvCache
from tests.decode.test_engine import BS, _prompts, _run, _run_admitting_when_possible, _seq, expected, runner  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _engine(runner, blocks: int, swap_blocks: int, min_tokens: int = 1, mirror: bool = True, budget: int = 64):
    block_bytes = PagedKvCache.block_bytes(runner.config, BS, runner.dtype)
    e = DecodeEngine(runner, 64, 64, None, kv_budget_bytes=blocks * block_bytes, block_size=BS, token_budget=budget,
                     swap_bytes=swap_blocks * block_bytes, swap_min_tokens=min_tokens, mirror=mirror)
    e.watermark_blocks = 0
    return e


@pytest.mark.parametrize("mirror", [True, False])
def test_swap_preemption_keeps_greedy_outputs(runner, expected, mirror):
    # 12 prompts of up to 45 tokens + 12 outputs in 24 blocks of 8: far too few for all at once
    engine = _engine(runner, blocks=24, swap_blocks=64, mirror=mirror)
    filled = runner.model.mirror.rows_filled
    got = _run_admitting_when_possible(engine, _prompts(runner.config.vocab_size))
    assert got == expected[0]  # the same tokens with the mirror on and off
    assert (runner.model.mirror.rows_filled > filled) == mirror  # off: decode rows gather from the pool
    s = engine.scheduler
    assert s.swaps_out > 0 and s.swaps_in == s.swaps_out and s.recomputes == 0
    assert engine.swap.num_used_blocks == 0
    engine.swap.check()


def test_shared_prefixes_survive_swap(runner, expected):
    engine = _engine(runner, blocks=20, swap_blocks=64)
    got = _run_admitting_when_possible(engine, _prompts(runner.config.vocab_size, shared=20))
    assert got == expected[20]
    assert engine.scheduler.swaps_out > 0 and engine.kv.prefix_hits > 0


def test_a_full_swap_space_falls_back_to_recompute(runner, expected):
    engine = _engine(runner, blocks=24, swap_blocks=4)  # room for one short sequence at a time
    got = _run_admitting_when_possible(engine, _prompts(runner.config.vocab_size))
    assert got == expected[0]
    s = engine.scheduler
    assert s.swaps_out > 0 and s.recomputes > 0
    short = _engine(runner, blocks=24, swap_blocks=64, min_tokens=10_000)  # every sequence too short to swap
    assert _run_admitting_when_possible(short, _prompts(runner.config.vocab_size)) == expected[0]
    assert short.scheduler.swaps_out == 0 and short.scheduler.recomputes > 0


def test_swap_copies_the_kv_out_and_back_exactly(runner):
    """A lone sequence swapped out (another holds the pool) and in: its KV after the swap
    equals its KV before, though its blocks changed; its tokens come once each."""
    engine = _engine(runner, blocks=6, swap_blocks=8)
    a = _seq(0, list(range(10, 20)), engine.max_seq_len)
    assert engine.reserve(a)
    engine.add(a)
    while len(a.tokens) < 17:  # position 16, fed next, needs a third block
        engine.step()
    before = engine.read_kv(a, a.num_computed)
    old_table = list(engine.kv.block_table(a))
    hog = _seq(1, list(range(30, 62)), engine.max_seq_len)  # 4 blocks: all the rest (a prefill in flight)
    assert engine.reserve(hog)
    engine.step()
    assert a in engine.scheduler.swapped and not engine.kv.has(a)
    assert not engine.reserve(_seq(2, [5, 6, 7], engine.max_seq_len))  # admissions wait for it
    engine.release(hog)
    engine.step()
    assert a in engine.scheduler.running and engine.kv.block_table(a) != old_table
    after = engine.read_kv(a, len(before[0][0, 0]))
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    engine.run_until_idle()
    items = [a.outbox.get_nowait() for _ in range(a.outbox.qsize())]
    assert [t for t, _ in items] == a.tokens[a.prompt_len:] and len(items) == 12 and items[-1][1] == "length"


def test_a_swapped_in_sequence_never_reads_stale_mirror_rows(runner):
    """The mirror keeps a row while the same sequence id decodes at the next position in the
    same row. A sequence swapped out and in with no step between (it was alone) would match
    that: the engine gives it a new id, so the row is gathered again from the pool. The row
    it held is poisoned to show nothing of it is read."""
    prompt = list(range(10, 20))
    plain = _engine(runner, blocks=64, swap_blocks=0)  # no preemption (test_engine: equals transformers)
    (reference,) = _run(plain, [prompt])
    engine = _engine(runner, blocks=6, swap_blocks=8)
    mirror = runner.model.mirror
    a = _seq(0, prompt, engine.max_seq_len)
    assert engine.reserve(a)
    engine.add(a)
    while len(a.tokens) < 17:
        engine.step()
    assert mirror.seq_ids and len(mirror.seq_ids) == 1
    hog = _seq(1, list(range(30, 62)), engine.max_seq_len)
    assert engine.reserve(hog)
    engine.step()  # a swaps out; nothing runs
    assert a in engine.scheduler.swapped and mirror.seq_ids  # the mirror still holds a's row
    with torch.inference_mode():  # the mirror's buffers are inference tensors
        for k, v in zip(mirror.k, mirror.v):
            k[0].fill_(math.nan)
            v[0].fill_(math.nan)
    engine.release(hog)
    filled = mirror.rows_filled
    engine.step()
    assert mirror.rows_filled == filled + 1  # gathered again, not reused
    engine.run_until_idle()
    got = [t for t, _ in (a.outbox.get_nowait() for _ in range(a.outbox.qsize()))]
    assert got == reference


def test_metrics_count_swaps_and_recomputes_apart(runner, tiny_model):
    worker = DecodeWorker(DecodeConfig(model_dir=str(tiny_model)))
    worker.engine = _engine(runner, blocks=24, swap_blocks=4)
    _run_admitting_when_possible(worker.engine, _prompts(runner.config.vocab_size))
    text = generate_latest(worker.metrics.registry).decode()
    s = worker.engine.scheduler
    assert f'elastune_decode_preemptions_total{{mode="swap"}} {float(s.swaps_out)}' in text
    assert f'elastune_decode_preemptions_total{{mode="recompute"}} {float(s.recomputes)}' in text
    assert s.swaps_out > 0 and s.recomputes > 0


def test_config_switches(tiny_model):
    env = {"ELASTUNE_DECODE_MIRROR": "false", "ELASTUNE_SWAP_SPACE_BYTES": "1048576"}
    cfg = from_env(DecodeConfig, env, model_dir=str(tiny_model))
    assert cfg.decode_mirror is False and cfg.swap_space_bytes == 1 << 20
    assert DecodeConfig(model_dir=str(tiny_model)).decode_mirror is True  # on by default, as before
    with pytest.raises(ValueError, match="swap_space_bytes"):
        DecodeConfig(model_dir=str(tiny_model), swap_space_bytes=-1).validate()
