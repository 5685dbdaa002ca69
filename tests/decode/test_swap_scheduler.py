"""Swap preemption in the scheduler (services/decode/scheduler.py with a SwapSpace): which
victims swap and which recompute, swap-in before new admissions, shared prefix blocks,
aborts and detaches while swapped. Pure bookkeeping: a real BlockManager and SwapSpace,
no model; a block-content simulation stands in for the KV tensors, so a plan that copies
the wrong blocks, or lets a step overwrite a block someone still reads, fails."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.types import SamplingParams
from services.decode.scheduler import Scheduler
from services.decode.sequence import Sequence
from services.engine.block_manager import BlockManager
from services.engine.swap_space import SwapSpace
from tests.decode.test_scheduler import batch_of

BS = 4


def seq(i: int, prompt: list[int], computed: bool = True) -> Sequence:
    """computed: the prompt's KV is in place and a first token (5) was sampled: running."""
    return Sequence(f"r{i}", i, list(prompt) + ([5] if computed else []), len(prompt), SamplingParams(max_tokens=100),
                    seed=i, eos_ids=frozenset(), max_len=1000, num_computed=len(prompt) if computed else 0)


class Sim:
    """A scheduler plus the contents its plans imply: device and host blocks hold, per row,
    the token prefix whose KV would be there (KV of position p depends on tokens[:p+1])."""

    def __init__(self, blocks: int, swap_blocks: int, min_tokens: int = 1, cap: int = 8, budget: int = 1000,
                 chunk: int = 0, reserve: int = 0):
        self.swap = SwapSpace(swap_blocks, BS) if swap_blocks else None
        self.s = Scheduler(BlockManager(blocks, BS), cap, budget, chunk, self.swap, min_tokens, reserve)
        self.device: dict[int, list] = {}
        self.host: dict[int, list] = {}
        self.stepped = 0

    def admit(self, q: Sequence) -> bool:
        """DecodeEngine.reserve + write_kv + add: blocks, KV for computed positions, arrival."""
        cached = self.s.kv.allocate(q, q.tokens, num_tokens=max(q.num_computed, 1))
        if cached is None:
            return False
        self._write(q, min(cached, q.num_computed), q.num_computed)
        self.s.add(q)
        return True

    def step(self, sample: int = 7):
        plan = self.s.schedule()
        for c in plan.swapped_out:  # the engine: copies out, then in, then runs the model
            assert len(c.device_blocks) == len(c.host_blocks)
            for d, h in zip(c.device_blocks, c.host_blocks):
                self.host[h] = list(self.device[d])
        for c in plan.swapped_in:
            for h, d in zip(c.host_blocks, c.device_blocks):
                self.device[d] = list(self.host[h])
        for q, n in plan.work:
            self._check(q, q.num_computed)  # everything it attends to is its own KV
            self._write(q, q.num_computed, q.num_computed + n)
        self.s.update(plan, [sample if q.num_computed + n == len(q.tokens) else None for q, n in plan.work])
        self.s.kv.check()
        if self.swap is not None:
            self.swap.check()
        for q in self.s.swapped:
            assert not self.s.kv.has(q) and self.swap.has(q)
            assert len(self.swap.table(q)) * BS >= q.num_computed == len(q.tokens) - 1
        self.stepped += 1
        return plan

    def finish(self, q: Sequence) -> None:
        self.s.finish([q])
        self.s.kv.free(q)

    def _write(self, q: Sequence, lo: int, hi: int) -> None:
        table = self.s.kv.block_table(q)
        for p in range(lo, hi):
            self.device.setdefault(table[p // BS], [None] * BS)[p % BS] = tuple(q.tokens[: p + 1])

    def _check(self, q: Sequence, n: int) -> None:
        table = self.s.kv.block_table(q)
        for p in range(n):
            assert self.device[table[p // BS]][p % BS] == tuple(q.tokens[: p + 1]), f"{q.request_id} position {p}"


def _admit_three(sim: Sim) -> tuple[Sequence, Sequence, Sequence]:
    """Three sequences of 7 prompt tokens (+1 fed), each holding 2 of the pool's blocks of 4."""
    trio = tuple(seq(i, list(range(10 + 10 * i, 17 + 10 * i))) for i in range(3))
    for q in trio:
        assert sim.admit(q)
    return trio


def test_the_newest_long_sequence_swaps_out_and_comes_back_first():
    # 6 blocks of 4: a, b, c (7 tokens + 1 fed) hold 2 each; growing past 8 needs a third
    sim = Sim(blocks=6, swap_blocks=8)
    a, b, c = _admit_three(sim)
    sim.step()
    plan = sim.step()  # position 8 needs a third block each: c (the newest) gives way
    assert [x.seq for x in plan.swapped_out] == [c] and plan.preempted == []
    out = plan.swapped_out[0]
    assert len(out.device_blocks) == 2 and len(out.host_blocks) == 2  # its 8 computed positions
    assert c in sim.s.swapped and c.num_computed == 8 and len(c.tokens) == 9  # KV kept, on the host
    assert batch_of(plan) == [a, b] and sim.s.swaps_out == 1 and sim.s.recomputes == 0 and sim.s.preemptions == 1
    # a new prompt waits: the swapped sequence gets blocks first
    d = seq(3, [90, 91, 92], computed=False)
    sim.s.add(d)
    sim.finish(a)  # 3 blocks free: enough for c (3 blocks for 9 positions)
    plan = sim.step()
    assert [x.seq for x in plan.swapped_in] == [c] and (c, 1) in plan.work
    assert [d_ for d_, _ in plan.work if d_ is d] == []  # d did not overtake c
    back = plan.swapped_in[0]
    assert back.host_blocks == out.host_blocks and back.device_blocks == tuple(sim.s.kv.block_table(c)[:2])
    assert c in sim.s.running and not sim.swap.has(c) and sim.swap.num_used_blocks == 0
    assert c.generated == 3 and c.num_computed == 9 and sim.s.swaps_in == 1


def test_short_sequences_and_a_full_swap_space_recompute():
    sim = Sim(blocks=6, swap_blocks=1, min_tokens=8)
    a, b, c = seq(0, list(range(10, 17))), seq(1, list(range(20, 27))), seq(2, list(range(30, 37)))
    for q in (a, b, c):
        assert sim.admit(q)
    sim.step()
    plan = sim.step()  # c has 8 computed tokens (>= min) but needs 2 host blocks; there is 1
    assert plan.preempted == [c] and plan.swapped_out == [] and c in sim.s.waiting and c.num_computed == 0
    assert sim.s.recomputes == 1 and sim.s.swaps_out == 0
    sim2 = Sim(blocks=6, swap_blocks=10, min_tokens=9)
    qs = [seq(i, list(range(10 + 10 * i, 17 + 10 * i))) for i in range(3)]
    for q in qs:
        assert sim2.admit(q)
    sim2.step()
    assert sim2.step().preempted == [qs[2]]  # 8 computed < 9: recompute is the cheaper one
    assert sim2.s.swaps_out == 0 and sim2.swap.num_used_blocks == 0


def test_a_sequence_with_shared_prefix_blocks_survives_swap_out_and_in():
    head = list(range(100, 108))  # two full blocks shared
    sim = Sim(blocks=8, swap_blocks=8)
    c = seq(2, list(range(40, 47)))  # 2 blocks
    a, b = seq(0, head + [1, 2, 3]), seq(1, head + [4, 5, 6])  # 3 blocks; b 1 of its own
    assert sim.admit(c) and sim.admit(a)
    sim.s.kv.commit(a, a.tokens, a.num_computed)  # a's prompt blocks enter the prefix cache
    assert sim.admit(b)
    shared = sim.s.kv.block_table(a)[:2]
    assert sim.s.kv.block_table(b)[:2] == shared and [sim.s.kv.ref_count(x) for x in shared] == [2, 2]
    sim.step()  # positions 7, 11, 11
    plan = sim.step()  # c takes a 3rd block, a a 4th: none left for b, the newest
    victim = plan.swapped_out[0]
    assert victim.seq is b and b.num_computed == 12
    assert victim.device_blocks[:2] == tuple(shared) and len(victim.host_blocks) == 3  # copied too (copy-on-swap)
    assert [sim.s.kv.ref_count(x) for x in shared] == [1, 1]  # ... and still a's, untouched
    assert sim.s.kv.block_table(a)[:2] == shared
    for _ in range(3):
        sim.step()  # a goes on over the shared blocks; the simulation checks their contents
    sim.finish(c)
    plan = sim.step()
    back = plan.swapped_in[0]
    assert back.seq is b
    assert sim.s.kv.block_table(b)[:2] == shared and [sim.s.kv.ref_count(x) for x in shared] == [2, 2]
    assert back.host_blocks == victim.host_blocks[2:]  # the cached prefix is mapped again, not copied
    for _ in range(4):
        sim.step()


def test_shared_blocks_evicted_while_swapped_out_come_back_from_the_host_copy():
    head = list(range(100, 108))
    sim = Sim(blocks=8, swap_blocks=8)
    c = seq(2, list(range(40, 47)))
    a, b = seq(0, head + [1, 2, 3]), seq(1, head + [4, 5, 6])
    assert sim.admit(c) and sim.admit(a)
    sim.s.kv.commit(a, a.tokens, a.num_computed)
    assert sim.admit(b)
    shared = sim.s.kv.block_table(a)[:2]
    sim.step()
    victim = sim.step().swapped_out[0]
    assert victim.seq is b and victim.device_blocks[:2] == tuple(shared)
    sim.finish(a)  # the shared blocks are cached with no reader now ...
    filler = seq(5, list(range(500, 519)))  # ... and a new sequence's 5 blocks evict them
    assert sim.admit(filler)
    assert set(shared) & set(sim.s.kv.block_table(filler))
    sim.step()
    sim.finish(filler)
    sim.finish(c)
    plan = sim.step()
    assert plan.swapped_in[0].seq is b
    assert plan.swapped_in[0].host_blocks == victim.host_blocks  # nothing cached: all copied back
    for _ in range(4):
        sim.step()  # contents checked: what was copied back is b's own KV


def test_abort_and_detach_while_swapped():
    sim = Sim(blocks=6, swap_blocks=8)
    a, b, c = _admit_three(sim)
    sim.step()
    sim.step()
    assert c in sim.s.swapped
    sim.s.abort(c)
    plan = sim.step()
    assert plan.released == [c] and not sim.s.swapped and sim.swap.num_used_blocks == 0
    assert all(q is not c for q in batch_of(plan))
    sim.finish(b)
    d = seq(3, list(range(60, 67)))
    assert sim.admit(d)
    while d not in sim.s.swapped:
        sim.step()
    sim.s.detach(d)
    plan = sim.step()
    assert plan.detached == [] and d in sim.s.swapped  # its KV is on the host: it detaches once back
    sim.finish(a)
    plan = sim.step()
    assert [x.seq for x in plan.swapped_in] == [d]
    plan = sim.step()
    assert plan.detached == [d] and sim.s.kv.has(d) and d not in sim.s.running


def test_no_swap_in_in_a_step_that_preempted_and_a_reserve_while_others_run():
    sim = Sim(blocks=6, swap_blocks=8, reserve=2)
    a, b, c = _admit_three(sim)
    sim.step()
    sim.step()  # c swapped out; a and b hold 3 blocks each now
    sim.finish(b)  # 3 free: c needs 3 but must leave 2 while a runs
    plan = sim.step()
    assert plan.swapped_in == [] and c in sim.s.swapped
    sim.finish(a)  # nothing runs: c takes what there is
    plan = sim.step()
    assert [x.seq for x in plan.swapped_in] == [c]


@settings(max_examples=100, deadline=None)
@given(
    cap=st.integers(1, 4),
    budget=st.integers(1, 12),
    chunk=st.integers(0, 5),
    blocks=st.integers(4, 12),
    swap_blocks=st.integers(0, 12),
    min_tokens=st.integers(1, 10),
    ops=st.lists(st.tuples(st.sampled_from(["add", "add", "prompt", "abort", "step", "step", "step", "finish"]),
                           st.integers(0, 50)), min_size=20, max_size=80),
)
def test_random_operations_with_swap_keep_invariants_and_contents(cap, budget, chunk, blocks, swap_blocks,
                                                                   min_tokens, ops):
    """As test_scheduler's random test, with a swap space: steps within cap and budget,
    released once, every attended position holds the sequence's own KV (through swaps,
    shared prefixes, evictions), swapped sequences hold host blocks only, nothing leaks."""
    sim = Sim(blocks, swap_blocks, min_tokens, cap, budget, chunk)
    s = sim.s
    heads = [[], list(range(200, 204)), list(range(300, 308))]  # shared prompt prefixes
    added: list[Sequence] = []
    done: set[int] = set()  # finished, released or aborted
    released: dict[int, int] = {}

    def run_step():
        plan = sim.step()
        assert len(plan.work) <= cap and plan.num_tokens <= budget
        assert len({id(q) for q in batch_of(plan)}) == len(plan.work)
        assert not (plan.swapped_in and plan.swapped_out)  # no swap-in in a step that swapped out
        for q in plan.released:
            released[id(q)] = released.get(id(q), 0) + 1
            if s.kv.has(q):  # DecodeEngine.release
                s.kv.free(q)
        for q, _ in plan.work:
            assert not q.aborted and id(q) not in done
            if q.finish_reason:
                s.kv.free(q)
                done.add(id(q))

    for op, arg in ops:
        if op in ("add", "prompt"):
            q = seq(len(added), heads[arg % 3] + list(range(1000 + 20 * len(added), 1001 + 20 * len(added) + arg % 7)),
                    computed=op == "add")
            q.max_len = blocks * BS  # as DecodeEngine.max_seq_len: a lone sequence always fits
            if not s.swapped and sim.admit(q):  # DecodeEngine.reserve admits nothing while some are swapped
                added.append(q)
        elif op == "abort" and added:
            q = added[arg % len(added)]
            if id(q) not in done:
                s.abort(q)
                done.add(id(q))
        elif op == "finish":
            live = [q for q in s.running if not q.aborted]
            if live:
                q = live[arg % len(live)]
                sim.finish(q)
                done.add(id(q))
        else:
            run_step()
    # drain: everything left runs until its budget, a little longer than now, is spent
    for q in added:
        q.params = SamplingParams(max_tokens=q.generated + 20)  # long enough to run the pool short again
    for _ in range(5000):
        if not s.has_work:
            break
        run_step()
    assert not s.has_work, "a sequence never came back"
    assert all(n == 1 for n in released.values())
    assert s.kv.num_used_blocks == 0
    assert sim.swap is None or sim.swap.num_used_blocks == 0
