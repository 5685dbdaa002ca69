"""Continuous batching with a token budget, chunked prefill and preemption
(services/decode/scheduler.py), and Sequence.finish_for. Pure bookkeeping: a real
BlockManager, no model."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.types import FinishReason, SamplingParams
from services.decode.scheduler import Scheduler
from services.decode.sequence import Sequence
from services.engine.block_manager import BlockManager

EOS = 2
BS = 4


def make_seq(i: int = 0, prompt_len: int = 4, params: SamplingParams | None = None, max_len: int = 1000,
             computed: bool = True) -> Sequence:
    """computed: the prompt's KV is in place and a first token was sampled (a running sequence);
    otherwise the prompt waits to be prefilled here."""
    tokens = list(range(10 + 100 * i, 10 + 100 * i + prompt_len)) + ([5] if computed else [])
    return Sequence(
        request_id=f"r{i}", slot=i, tokens=tokens, prompt_len=prompt_len,
        params=params or SamplingParams(max_tokens=100), seed=i, eos_ids=frozenset({EOS}), max_len=max_len,
        num_computed=prompt_len if computed else 0,
    )


def sched(cap: int = 8, budget: int = 1000, chunk: int = 0, blocks: int = 1000) -> Scheduler:
    return Scheduler(BlockManager(blocks, BS), max_batch_size=cap, token_budget=budget, chunk_size=chunk)


def admit(s: Scheduler, seq: Sequence) -> None:
    """What DecodeEngine.reserve + add do: blocks for the tokens that have KV, then arrival."""
    assert s.kv.allocate(seq, seq.tokens, num_tokens=max(seq.num_computed, 1)) is not None
    s.add(seq)


def step(s: Scheduler):
    """schedule, then pretend the model ran: each finished chunk samples token 7."""
    plan = s.schedule()
    sampled = [7 if seq.num_computed + n == len(seq.tokens) else None for seq, n in plan.work]
    s.update(plan, sampled)
    return plan


def batch_of(plan) -> list[Sequence]:
    return [seq for seq, _ in plan.work]


def test_arrivals_join_at_next_schedule():
    s = sched()
    a = make_seq(0)
    assert not s.has_work
    admit(s, a)
    assert s.has_work
    assert s.running == []  # not running until the engine schedules
    plan = s.schedule()
    assert plan.work == [(a, 1)] and plan.released == []
    b = make_seq(1)
    admit(s, b)
    assert s.running == [a]
    assert batch_of(s.schedule()) == [a, b]


def test_aborted_running_sequence_released_once_and_never_scheduled():
    s = sched()
    a, b = make_seq(0), make_seq(1)
    admit(s, a)
    admit(s, b)
    s.schedule()
    s.abort(a)
    plan = s.schedule()
    assert plan.released == [a]
    assert batch_of(plan) == [b]
    for _ in range(3):
        plan = s.schedule()
        assert plan.released == [] and a not in batch_of(plan)
    assert a not in s.running


def test_aborted_before_arrival_and_while_waiting_released_once():
    s = sched()
    a, b, c = make_seq(0), make_seq(1), make_seq(2, prompt_len=50, computed=False)
    admit(s, a)
    s.abort(a)
    admit(s, b)
    plan = s.schedule()
    assert plan.released == [a] and batch_of(plan) == [b]
    admit(s, c)
    s.schedule()
    s.abort(c)  # mid-prefill
    plan = s.schedule()
    assert plan.released == [c] and batch_of(plan) == [b]
    s.abort(b)
    plan = s.schedule()
    assert (plan.work, plan.released) == ([], [b])
    assert not s.has_work


def test_finish_removes():
    s = sched(cap=2)
    seqs = [make_seq(i) for i in range(3)]
    for q in seqs:
        admit(s, q)
    plan = s.schedule()
    s.finish(batch_of(plan)[:1])
    assert seqs[0] not in s.running and len(s.running) == 2
    for _ in range(4):
        plan = s.schedule()
        assert seqs[0] not in batch_of(plan) and plan.released == []
    s.finish(list(s.running))
    assert s.running == [] and not s.has_work


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("cap", [1, 2, 3, 8])
def test_batch_cap_and_rotation(n, cap):
    s = sched(cap=cap)
    seqs = [make_seq(i) for i in range(n)]
    for q in seqs:
        admit(s, q)
    window = math.ceil(n / cap)
    history = []
    for _ in range(3 * window + 2):
        plan = s.schedule()
        assert plan.released == [] and len(plan.work) == min(n, cap)
        assert len({id(q) for q in batch_of(plan)}) == len(plan.work)  # no sequence twice in one step
        history.append({id(q) for q in batch_of(plan)})
    for start in range(len(history) - window + 1):
        covered = set().union(*history[start : start + window])
        assert covered == set(map(id, seqs)), f"window starting at step {start} misses a sequence"
    counts = [sum(id(q) in h for h in history) for q in seqs]
    assert max(counts) - min(counts) <= 1


def test_lowering_the_cap_takes_effect_at_next_schedule():
    s = sched()
    seqs = [make_seq(i) for i in range(5)]
    for q in seqs:
        admit(s, q)
    assert len(s.schedule().work) == 5
    s.max_batch_size = 2
    seen = set()
    for _ in range(3):
        plan = s.schedule()
        assert len(plan.work) == 2
        seen |= {id(q) for q in batch_of(plan)}
    assert seen == set(map(id, seqs))


def test_decodes_first_then_prompt_chunks_within_budget():
    s = sched(budget=10, chunk=4)
    running = [make_seq(i) for i in range(3)]
    long = make_seq(5, prompt_len=23, computed=False)
    for q in running + [long]:
        admit(s, q)
    sizes = []
    while long.generated == 0:
        plan = step(s)
        assert [n for _, n in plan.work[:3]] == [1, 1, 1]  # every running sequence advances
        assert plan.num_tokens <= 10
        sizes += [n for q, n in plan.work if q is long]
    assert sizes == [4, 4, 4, 4, 4, 3]  # chunks of at most 4; the last one samples the first token
    assert long in s.running and long.num_computed == 23


def test_without_chunk_size_a_prompt_takes_the_rest_of_the_budget():
    s = sched(budget=16)
    a = make_seq(0)
    p = make_seq(1, prompt_len=40, computed=False)
    admit(s, a)
    admit(s, p)
    assert [n for _, n in step(s).work] == [1, 15]
    assert [n for _, n in step(s).work] == [1, 15]
    assert [n for _, n in step(s).work] == [1, 10]
    assert p.generated == 1 and p in s.running


def test_preemption_frees_the_newest_and_recomputes_it():
    # 6 blocks of 4: a and b (7 tokens + 1 fed) hold 2 each; c 2; growing past 8 needs more
    s = sched(blocks=6)
    a, b, c = make_seq(0, prompt_len=7), make_seq(1, prompt_len=7), make_seq(2, prompt_len=7)
    for q in (a, b, c):
        admit(s, q)
    plan = step(s)  # each writes position 7: still in its second block
    assert plan.preempted == [] and len(plan.work) == 3
    plan = step(s)  # position 8 needs a third block each: only c (the newest) can give way
    assert plan.preempted == [c]
    assert batch_of(plan) == [a, b]
    assert c.num_computed == 0 and not s.kv.has(c) and c in s.waiting
    assert c.tokens[-1] == 7 and len(c.tokens) == 9  # its tokens (and sampling indices) are kept
    s.kv.check()
    s.finish([a])
    s.kv.free(a)
    plan = step(s)
    assert (c, 9) in plan.work  # prompt + both outputs recomputed in one chunk
    assert c in s.running and c.num_computed == 9 and c.generated == 3  # and the next token sampled
    plan = step(s)
    assert (c, 1) in plan.work and c.generated == 4


def test_a_lone_sequence_that_cannot_grow_waits_instead_of_crashing():
    s = sched(blocks=2)
    a = make_seq(0, prompt_len=7)
    admit(s, a)
    step(s)  # position 7
    plan = s.schedule()  # position 8 needs a third block, the pool has two
    assert plan.work == [] and plan.preempted == [a] and a in s.waiting
    s.kv.check()


@settings(max_examples=150, deadline=None)
@given(
    cap=st.integers(1, 4),
    budget=st.integers(1, 12),
    chunk=st.integers(0, 5),
    blocks=st.integers(4, 30),
    ops=st.lists(st.tuples(st.sampled_from(["add", "prompt", "abort", "step", "finish"]), st.integers(0, 50)), max_size=60),
)
def test_random_operations_keep_invariants(cap, budget, chunk, blocks, ops):
    """Released exactly once per aborted sequence; steps within cap and budget, unique, never
    aborted or finished; every scheduled position has a block; block accounting holds."""
    s = sched(cap=cap, budget=budget, chunk=chunk, blocks=blocks)
    added: list[Sequence] = []
    aborted: set[int] = set()
    finished: set[int] = set()
    released_count: dict[int, int] = {}
    for op, arg in ops:
        if op in ("add", "prompt"):
            q = make_seq(len(added), prompt_len=1 + arg % 9, computed=op == "add")
            if s.kv.allocate(q, q.tokens, num_tokens=max(q.num_computed, 1)) is None:
                continue
            added.append(q)
            s.add(q)
        elif op == "abort" and added:
            q = added[arg % len(added)]
            if id(q) not in finished:
                s.abort(q)
                aborted.add(id(q))
        elif op == "finish":
            live = [q for q in s.running if not q.aborted]
            if live:
                q = live[arg % len(live)]
                s.finish([q])
                s.kv.free(q)
                finished.add(id(q))
        else:
            plan = s.schedule()
            assert len(plan.work) <= cap and plan.num_tokens <= budget
            assert len({id(q) for q in batch_of(plan)}) == len(plan.work)
            for q, n in plan.work:
                assert id(q) not in aborted and id(q) not in finished and n >= 1
                assert not chunk or n <= chunk or n == 1
                assert s.kv.capacity(q) >= q.num_computed + n  # blocks for every position computed
            for q in plan.released:
                assert id(q) in aborted
                released_count[id(q)] = released_count.get(id(q), 0) + 1
                if s.kv.has(q):
                    s.kv.free(q)
            s.update(plan, [7 if q.num_computed + n == len(q.tokens) else None for q, n in plan.work])
        s.kv.check()
    plan = s.schedule()  # a final boundary releases whatever was aborted since the last one
    for q in plan.released:
        released_count[id(q)] = released_count.get(id(q), 0) + 1
    assert released_count == {i: 1 for i in aborted}
    assert s.schedule().released == []


def _finish_after(seq: Sequence, token: int) -> str | None:
    seq.tokens.append(token)
    return seq.finish_for(token)


def test_finish_for_eos():
    seq = make_seq(params=SamplingParams(max_tokens=10))
    assert _finish_after(seq, 7) is None
    assert _finish_after(seq, EOS) == FinishReason.STOP


def test_finish_for_ignore_eos():
    seq = make_seq(params=SamplingParams(max_tokens=10, ignore_eos=True))
    assert _finish_after(seq, EOS) is None
    assert _finish_after(seq, EOS) is None


def test_finish_for_stop_token_ids_even_with_ignore_eos():
    seq = make_seq(params=SamplingParams(max_tokens=10, stop_token_ids=(9, 11), ignore_eos=True))
    assert _finish_after(seq, 7) is None
    assert _finish_after(seq, 11) == FinishReason.STOP


def test_finish_for_max_tokens():
    seq = make_seq(prompt_len=4, params=SamplingParams(max_tokens=3))
    assert seq.generated == 1  # make_seq appends the first output token
    assert _finish_after(seq, 7) is None
    assert seq.generated == 2
    assert _finish_after(seq, 7) == FinishReason.LENGTH
    assert seq.generated == 3


def test_finish_for_max_len():
    seq = make_seq(prompt_len=4, params=SamplingParams(max_tokens=100), max_len=7)
    assert len(seq.tokens) == 5
    assert _finish_after(seq, 7) is None
    assert _finish_after(seq, 7) == FinishReason.LENGTH  # 7 tokens fill the slot


def test_stop_wins_over_length():
    seq = make_seq(prompt_len=4, params=SamplingParams(max_tokens=2))
    assert _finish_after(seq, EOS) == FinishReason.STOP


def test_position_and_generated():
    seq = make_seq(prompt_len=4)
    assert seq.position == 4  # tokens[-1] (the first output token) is written at position 4
    seq.tokens.append(3)
    assert seq.position == 5 and seq.generated == 2
