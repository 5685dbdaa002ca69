"""DecodeEngine offline (no event loop) on the tiny model: greedy tokens equal transformers'
whatever the token budget, chunk size, KV pool size (preemption) and prefix sharing."""

from __future__ import annotations

import queue

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.common.types import SamplingParams
from services.decode.engine import DecodeEngine
from services.decode.sequence import Sequence
from services.engine.kv_cache import PagedKvCache
from services.engine.runner import ModelRunner

BS = 8
N_PROMPTS = 12
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def runner(tiny_model):
    before = torch.get_num_threads()
    r = ModelRunner(tiny_model, dtype="float32", threads=1)
    yield r
    torch.set_num_threads(before)


def _prompts(vocab: int, shared: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    head = torch.randint(5, vocab, (shared,), generator=g).tolist()
    return [head + torch.randint(5, vocab, (3 + (i * 11) % 37,), generator=g).tolist() for i in range(N_PROMPTS)]


@pytest.fixture(scope="module")
def expected(tiny_model):
    """transformers greedy continuations, for the plain and the shared-prefix prompt sets."""
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    vocab = hf.config.vocab_size
    out = {}
    for shared in (0, 20):
        refs = []
        for p in _prompts(vocab, shared):
            ids = list(p)
            for _ in range(MAX_TOKENS):  # full forwards, EOS not special (the engine runs with ignore_eos)
                with torch.no_grad():
                    ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
            refs.append(ids[len(p):])
        out[shared] = refs
    return out


def _engine(runner, blocks: int, budget: int, chunk: int = 0, batch: int = 64) -> DecodeEngine:
    block_bytes = PagedKvCache.block_bytes(runner.config, BS, runner.dtype)
    return DecodeEngine(runner, 64, batch, None, kv_budget_bytes=blocks * block_bytes, block_size=BS,
                        token_budget=budget, chunk_size=chunk)


def _seq(i: int, prompt: list[int], max_len: int) -> Sequence:
    return Sequence(f"r{i}", -1, list(prompt), len(prompt), SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                    ignore_eos=True), seed=i, eos_ids=frozenset(), max_len=max_len, outbox=queue.SimpleQueue())


def _run(engine: DecodeEngine, prompts: list[list[int]], stagger: int = 0) -> list[list[int]]:
    """Admit every prompt (local prefill), optionally a few steps apart; return the tokens."""
    seqs = [_seq(i, p, engine.max_seq_len) for i, p in enumerate(prompts)]
    for i, s in enumerate(seqs):
        assert engine.reserve(s)
        engine.add(s)
        for _ in range(stagger if i % 3 == 2 else 0):  # later arrivals join a running batch
            engine.step()
    engine.run_until_idle()
    outs = []
    for s in seqs:
        items = []
        while not s.outbox.empty():
            items.append(s.outbox.get_nowait())
        assert [f for _, f in items[:-1]] == [None] * (len(items) - 1) and items[-1][1] == "length"
        outs.append([t for t, _ in items])
        assert s.tokens[s.prompt_len:] == outs[-1]  # delivered exactly the generated tokens, once each
    assert engine.kv.num_used_blocks == 0
    assert engine.slots.used == 0
    engine.kv.check()
    return outs


@pytest.mark.parametrize("budget,chunk,stagger", [(2048, 0, 0), (16, 5, 2), (7, 0, 1)])
def test_greedy_matches_transformers_for_any_budget_and_chunk(runner, expected, budget, chunk, stagger):
    engine = _engine(runner, blocks=256, budget=budget, chunk=chunk)
    got = _run(engine, _prompts(runner.config.vocab_size), stagger)
    assert got == expected[0]
    steps = engine.profile.records()
    assert max(s.tokens for s in steps) <= budget
    assert engine.scheduler.preemptions == 0
    if chunk:
        assert any(s.prefill_tokens and s.decode_tokens for s in steps)  # chunks rode along with decodes


def test_long_prompt_never_stalls_decodes_more_than_one_chunk(runner):
    engine = _engine(runner, blocks=256, budget=12, chunk=6)
    short = _seq(0, [7, 8, 9], engine.max_seq_len)
    assert engine.reserve(short)
    engine.add(short)
    engine.step()  # short's prompt: now it decodes
    long = _seq(1, list(range(10, 90)), engine.max_seq_len)
    assert engine.reserve(long)
    engine.add(long)
    before = short.outbox.qsize()
    for i in range(5):
        engine.step()
        assert short.outbox.qsize() == before + i + 1  # a token every step while the prompt is chunked
    assert long.num_computed == 5 * 6
    assert all(s.prefill_tokens <= 6 for s in engine.profile.records())


def test_preemption_keeps_greedy_outputs(runner, expected):
    # 12 prompts of up to 45 tokens + 12 outputs in 24 blocks of 8: far too few for all at once
    engine = _engine(runner, blocks=24, budget=64)
    engine.watermark_blocks = 0
    got = _run_admitting_when_possible(engine, _prompts(runner.config.vocab_size))
    assert got == expected[0]
    assert engine.scheduler.preemptions > 0


def _run_admitting_when_possible(engine: DecodeEngine, prompts):
    """Like a decode worker: admit while there is room, step, admit the rest as room frees."""
    seqs = [_seq(i, p, engine.max_seq_len) for i, p in enumerate(prompts)]
    pending = list(seqs)
    while pending or engine.scheduler.has_work:
        while pending and engine.reserve(pending[0]):
            engine.add(pending.pop(0))
        engine.step()
    outs = []
    for s in seqs:
        items = [s.outbox.get_nowait() for _ in range(s.outbox.qsize())]
        outs.append([t for t, _ in items])
    engine.kv.check()
    assert engine.slots.used == 0
    return outs


def test_shared_prefix_shares_blocks_and_gives_same_tokens(runner, expected):
    engine = _engine(runner, blocks=256, budget=2048)
    prompts = _prompts(runner.config.vocab_size, shared=20)  # 2 full blocks of 8 in common
    first = _seq(0, prompts[0], engine.max_seq_len)
    assert engine.reserve(first)
    engine.add(first)
    engine.step()  # its prompt is computed: the shared blocks enter the prefix cache
    second = _seq(1, prompts[1], engine.max_seq_len)
    assert engine.reserve(second)
    assert second.num_computed == 16
    shared = engine.kv.block_table(first)[:2]
    assert engine.kv.block_table(second)[:2] == shared
    assert [engine.kv.ref_count(b) for b in shared] == [2, 2]
    engine.add(second)
    engine.run_until_idle()
    rest = _run(engine, prompts[2:])
    toks = [[t for t, _ in (s.outbox.get_nowait() for _ in range(s.outbox.qsize()))] for s in (first, second)]
    assert toks + rest == expected[20]
    assert engine.kv.prefix_hits >= 2 * (N_PROMPTS - 1)
