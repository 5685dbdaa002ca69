"""The decode mirror switch (DecodeConfig.decode_mirror), offline on the tiny model: off, the
model's CPU mirror is never used and greedy tokens stay equal to transformers' (and to the
run with it on, which does use it). Swap preemption with the mirror on and off, and stale
mirror rows after a swap, are tests/decode/test_swap.py."""

from __future__ import annotations

from services.decode.engine import DecodeEngine
from services.engine.kv_cache import PagedKvCache
from tests.decode.test_engine import BS, _prompts, _run, expected, runner  # noqa: F401


def _engine(runner, mirror: bool) -> DecodeEngine:
    block_bytes = PagedKvCache.block_bytes(runner.config, BS, runner.dtype)
    return DecodeEngine(runner, 64, 64, None, kv_budget_bytes=256 * block_bytes, block_size=BS, token_budget=64,
                        mirror=mirror)


def test_mirror_switch_gives_identical_tokens(runner, expected):
    prompts = _prompts(runner.config.vocab_size)
    mirror = runner.model.mirror
    mirror.forget()
    filled = mirror.rows_filled
    assert _run(_engine(runner, mirror=False), prompts) == expected[0]
    assert mirror.rows_filled == filled and mirror.seq_ids == ()  # never used: decode rows gathered from the pool
    assert _run(_engine(runner, mirror=True), prompts) == expected[0]
    assert mirror.rows_filled > filled  # and this time it was
