"""Continuous-batching bookkeeping (services/decode/scheduler.py) and Sequence.finish_for."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.types import FinishReason, SamplingParams
from services.decode.scheduler import Scheduler
from services.decode.sequence import Sequence

EOS = 2


def make_seq(i: int = 0, prompt_len: int = 4, params: SamplingParams | None = None, max_len: int = 1000) -> Sequence:
    return Sequence(
        request_id=f"r{i}", slot=i, tokens=list(range(10, 10 + prompt_len)) + [5], prompt_len=prompt_len,
        params=params or SamplingParams(max_tokens=100), seed=i, eos_ids=frozenset({EOS}), max_len=max_len,
    )


def test_arrivals_join_at_next_schedule():
    s = Scheduler(max_batch_size=8)
    a = make_seq(0)
    assert not s.has_work
    s.add(a)
    assert s.has_work
    assert s.running == []  # not running until the engine schedules
    batch, released = s.schedule()
    assert batch == [a] and released == []
    b = make_seq(1)
    s.add(b)
    assert s.running == [a]
    batch, _ = s.schedule()
    assert batch == [a, b]


def test_aborted_running_sequence_released_once_and_never_scheduled():
    s = Scheduler(max_batch_size=8)
    a, b = make_seq(0), make_seq(1)
    s.add(a)
    s.add(b)
    s.schedule()
    s.abort(a)
    batch, released = s.schedule()
    assert released == [a]
    assert batch == [b]
    for _ in range(3):
        batch, released = s.schedule()
        assert released == []
        assert a not in batch
    assert a not in s.running


def test_aborted_before_arrival_released_once():
    s = Scheduler(max_batch_size=8)
    a, b = make_seq(0), make_seq(1)
    s.add(a)
    s.abort(a)
    s.add(b)
    batch, released = s.schedule()
    assert released == [a]
    assert batch == [b]
    batch, released = s.schedule()
    assert released == [] and batch == [b]
    # aborting the last one leaves nothing to do
    s.abort(b)
    batch, released = s.schedule()
    assert (batch, released) == ([], [b])
    assert not s.has_work


def test_finish_removes():
    s = Scheduler(max_batch_size=2)
    seqs = [make_seq(i) for i in range(3)]
    for q in seqs:
        s.add(q)
    batch, _ = s.schedule()
    s.finish(batch[:1])
    assert batch[0] not in s.running
    assert len(s.running) == 2
    for _ in range(4):
        batch, released = s.schedule()
        assert seqs[0] not in batch and released == []
    s.finish(list(s.running))
    assert s.running == [] and not s.has_work


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 13])
@pytest.mark.parametrize("cap", [1, 2, 3, 4, 8])
def test_batch_cap_and_rotation(n, cap):
    s = Scheduler(max_batch_size=cap)
    seqs = [make_seq(i) for i in range(n)]
    for q in seqs:
        s.add(q)
    window = math.ceil(n / cap)
    history = []
    for _ in range(3 * window + 2):
        batch, released = s.schedule()
        assert released == []
        assert len(batch) == min(n, cap)
        assert len(set(map(id, batch))) == len(batch)  # no sequence twice in one step
        history.append({id(q) for q in batch})
    for start in range(len(history) - window + 1):
        covered = set().union(*history[start : start + window])
        assert covered == set(map(id, seqs)), f"window starting at step {start} misses a sequence"
    # over many steps every sequence advances equally often (to within one step)
    counts = [sum(id(q) in h for h in history) for q in seqs]
    assert max(counts) - min(counts) <= 1


def test_lowering_the_cap_takes_effect_at_next_schedule():
    s = Scheduler(max_batch_size=8)
    seqs = [make_seq(i) for i in range(5)]
    for q in seqs:
        s.add(q)
    assert len(s.schedule()[0]) == 5
    s.max_batch_size = 2
    seen = set()
    for _ in range(3):
        batch, _ = s.schedule()
        assert len(batch) == 2
        seen |= set(map(id, batch))
    assert seen == set(map(id, seqs))


@settings(max_examples=150, deadline=None)
@given(
    cap=st.integers(1, 4),
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "abort", "step", "finish"]), st.integers(0, 50)),
        max_size=60,
    ),
)
def test_random_operations_keep_invariants(cap, ops):
    """Released exactly once per aborted sequence; batches capped, unique, never aborted or finished."""
    s = Scheduler(max_batch_size=cap)
    added: list[Sequence] = []
    aborted: set[int] = set()
    finished: set[int] = set()
    released_count: dict[int, int] = {}
    last_batch: list[Sequence] = []
    for op, arg in ops:
        if op == "add":
            q = make_seq(len(added))
            added.append(q)
            s.add(q)
        elif op == "abort" and added:
            q = added[arg % len(added)]
            if id(q) not in finished:
                s.abort(q)
                aborted.add(id(q))
        elif op == "finish" and last_batch:
            q = last_batch[arg % len(last_batch)]
            if id(q) not in finished and id(q) not in aborted:
                s.finish([q])
                finished.add(id(q))
            last_batch = [x for x in last_batch if x is not q]
        else:
            batch, released = s.schedule()
            assert len(batch) <= cap
            assert len(set(map(id, batch))) == len(batch)
            for q in batch:
                assert id(q) not in aborted
                assert id(q) not in finished
            for q in released:
                assert id(q) in aborted
                released_count[id(q)] = released_count.get(id(q), 0) + 1
            live = [q for q in added if id(q) not in aborted and id(q) not in finished]
            assert len(batch) == min(cap, len(live))
            last_batch = batch
    _, released = s.schedule()  # a final boundary releases whatever was aborted since the last one
    for q in released:
        released_count[id(q)] = released_count.get(id(q), 0) + 1
    assert released_count == {i: 1 for i in aborted}
    assert s.schedule()[1] == []

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
