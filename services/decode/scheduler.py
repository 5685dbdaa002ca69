"""Continuous batching with chunked prefill and preemption, under a per-step token budget.

Pure bookkeeping, no torch: what each sequence computes in the next step, and which KV
blocks it holds (through the BlockManager). The event loop adds, aborts and detaches; the
engine thread schedules and updates, so the arrivals hand-off is guarded by a lock.

A sequence is either running (KV computed for every token but the last, which the next
step feeds: one token per step), waiting (tokens still to compute: a prompt prefilled
here, or prompt + output recomputed after a preemption; fed in chunks) or swapped (a
preempted running sequence whose KV was copied to the host swap space; see swap_space.py).

Preemption mode, per victim: swap when a swap space is configured, it has room for the
victim's computed blocks, and the victim has at least `swap_min_tokens` computed tokens;
otherwise recompute. Recomputing n tokens costs a prefill of n tokens (the whole model's
weights and matmuls); swapping costs copying n tokens' KV out and back in, which grows
with n far more slowly (bench/swap.py), so the long sequences swap and the short ones,
whose recompute is one small chunk, are recomputed.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from ..engine.block_manager import BlockManager, blocks_for_tokens
from ..engine.swap_space import SwapCopy, SwapSpace
from .sequence import Sequence


@dataclass
class StepPlan:
    work: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens this step)
    released: list[Sequence] = field(default_factory=list)  # aborted: the engine frees their seat and KV
    detached: list[Sequence] = field(default_factory=list)  # left the batch keeping their KV (migration)
    preempted: list[Sequence] = field(default_factory=list)  # KV freed, requeued to recompute
    swapped_out: list[SwapCopy] = field(default_factory=list)  # the engine copies these out before the step
    swapped_in: list[SwapCopy] = field(default_factory=list)  # ... and these in (after the swap-outs)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.work)


class Scheduler:
    def __init__(self, kv: BlockManager, max_batch_size: int, token_budget: int, chunk_size: int = 0,
                 swap: SwapSpace | None = None, swap_min_tokens: int = 1, swap_in_reserve: int = 0):
        self.kv = kv
        self.max_batch_size = max_batch_size
        self.token_budget = token_budget
        self.chunk_size = chunk_size  # 0: a prompt takes whatever budget is left
        self.swap = swap  # None: every preemption recomputes
        self.swap_min_tokens = max(swap_min_tokens, 1)
        # blocks a swap-in leaves free while others run, so they can grow without evicting it at once
        self.swap_in_reserve = swap_in_reserve
        self.running: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.swapped: deque[Sequence] = deque()  # oldest first; KV in the swap space, no device blocks
        self.recomputes = 0
        self.swaps_out = 0
        self.swaps_in = 0
        self._arrivals: list[Sequence] = []
        self._lock = threading.Lock()

    def add(self, seq: Sequence) -> None:
        with self._lock:
            self._arrivals.append(seq)

    def abort(self, seq: Sequence) -> None:
        seq.aborted = True  # read by schedule() on the engine thread

    def detach(self, seq: Sequence) -> None:
        seq.detach_requested = True  # read by schedule() on the engine thread

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.swapped or self._arrivals)

    @property
    def preemptions(self) -> int:
        """Every preemption, either mode."""
        return self.recomputes + self.swaps_out

    def schedule(self) -> StepPlan:
        """Plan the next step.

        Invariants: every sequence is in exactly one of arrivals, running, waiting, swapped,
        or none (finished, released, detached); an aborted one is released exactly once and
        never stepped again; a detached one leaves running with its KV. A step holds at most
        max_batch_size sequences, each once, and at most token_budget tokens; every running
        sequence in the step gets its one token before any prompt chunk, so a long prompt
        delays running sequences by at most one chunk; each chunk is at most chunk_size.
        Every scheduled sequence has KV blocks for all the positions it computes; when the
        pool runs short the most recently scheduled running sequence (then waiting ones
        holding blocks) is preempted: a running victim is swapped out (its computed blocks
        copied to the swap space, see the module docstring for the rule) or its blocks are
        freed and it is requeued to recompute; a waiting victim is always recomputed.
        A swapped sequence holds host blocks for every computed position and no device
        block; it comes back (blocks reallocated, KV copied in, table rewritten) before it
        runs again, oldest first, only in a step whose running sequences preempted nothing
        (a prompt chunk later in the step may still recompute a waiting victim: no copy),
        and before any waiting sequence that holds no blocks may take some: swapped
        sequences go ahead of new admissions. Swap-outs happen only while running sequences
        get their blocks, so every swap-in of a step is planned after its swap-outs and none
        of a step's swap-outs follows one of its swap-ins; host blocks a swap-in frees are
        not reused within the same step.
        When more sequences are running than fit, the batch rotates so each advances in turn.
        """
        plan = StepPlan()
        with self._lock:
            arrivals, self._arrivals = self._arrivals, []
        for seq in arrivals:
            (self.running if seq.num_computed >= len(seq.tokens) - 1 else self.waiting).append(seq)
        self._drop_aborted_and_detached(plan)
        budget = self.token_budget
        scheduled = 0
        while scheduled < len(self.running) and len(plan.work) < self.max_batch_size and budget > 0:
            seq = self.running[scheduled]
            if self.kv.grow(seq, len(seq.tokens)):  # room for the K/V of the token fed now
                plan.work.append((seq, 1))
                budget -= 1
                scheduled += 1
            elif not self._preempt_one(plan, keep=seq, first_unscheduled=scheduled + 1):
                self._preempt(seq, plan)  # nothing else to take from: this one waits
                self.running.pop(scheduled)
        if 0 < scheduled < len(self.running):
            self.running = self.running[scheduled:] + self.running[:scheduled]
        if self.swapped and not (plan.preempted or plan.swapped_out):
            budget = self._swap_in(plan, budget)
        for seq in list(self.waiting):
            if budget <= 0 or len(plan.work) >= self.max_batch_size:
                break
            if self.swapped and not self.kv.has(seq):
                continue  # swapped sequences get blocks first; one mid-prompt goes on with its own
            n = self._chunk(seq, budget, plan)
            if n == 0:
                break  # first come, first served: later prompts do not overtake a stuck one
            plan.work.append((seq, n))
            budget -= n
        return plan

    def update(self, plan: StepPlan, sampled: list[int | None]) -> list[Sequence]:
        """After the step ran: advance what was computed, append sampled tokens; returns the
        sequences that got a new token (their finish_reason is set when they are done)."""
        grew = []
        for (seq, n), token in zip(plan.work, sampled):
            seq.num_computed += n
            self.kv.commit(seq, seq.tokens, seq.num_computed)
            if token is None:
                continue  # a prompt chunk that is not the last
            seq.tokens.append(token)
            seq.finish_reason = seq.finish_for(token)
            grew.append(seq)
            if seq.finish_reason:
                self._remove(seq)
            elif seq in self.waiting:
                self.waiting.remove(seq)
                self.running.append(seq)
        return grew

    def finish(self, finished: list[Sequence]) -> None:
        for seq in finished:
            self._remove(seq)

    # ---- internals ----

    def _drop_aborted_and_detached(self, plan: StepPlan) -> None:
        # a swapped sequence asked to detach stays swapped: it detaches once it is back
        swapped_aborted = [s for s in self.swapped if s.aborted]
        plan.released = [s for s in self.running if s.aborted] + [s for s in self.waiting if s.aborted] + swapped_aborted
        plan.detached = [s for s in self.running if s.detach_requested and not s.aborted]
        if plan.released or plan.detached:
            self.running = [s for s in self.running if not (s.aborted or s.detach_requested)]
            self.waiting = deque(s for s in self.waiting if not s.aborted)
        if swapped_aborted:
            self.swapped = deque(s for s in self.swapped if not s.aborted)
            for seq in swapped_aborted:
                self.swap.free(seq)

    def _chunk(self, seq: Sequence, budget: int, plan: StepPlan) -> int:
        """Blocks for the next chunk of a waiting sequence; returns its size (0: no room)."""
        fresh = not self.kv.has(seq)
        if fresh:
            seq.num_computed = self.kv.allocate(seq, seq.tokens, num_tokens=0)  # prefix-cache hits only
        n = min(len(seq.tokens) - seq.num_computed, self.chunk_size or budget, budget)
        while not self.kv.grow(seq, seq.num_computed + n):
            if not self._preempt_waiting(plan, keep=seq):
                if fresh:  # hold nothing while stuck
                    self.kv.free(seq)
                    seq.num_computed = 0
                return 0
        return n

    def _preempt_one(self, plan: StepPlan, keep: Sequence, first_unscheduled: int) -> bool:
        """Free blocks for `keep`: the newest unscheduled running sequence, else a waiting one."""
        if len(self.running) > first_unscheduled:
            self._preempt(self.running.pop(), plan)
            return True
        return self._preempt_waiting(plan, keep)

    def _preempt_waiting(self, plan: StepPlan, keep: Sequence) -> bool:
        for seq in reversed(self.waiting):
            if seq is not keep and self.kv.has(seq) and all(seq is not s for s, _ in plan.work):
                self._preempt(seq, plan, requeue=False)
                return True
        return False

    def _preempt(self, seq: Sequence, plan: StepPlan, requeue: bool = True) -> None:
        """Swap out a running victim if the rule says so (requeue), else recompute later:
        drop the KV, keep the tokens (and so the sampling indices)."""
        seq.preemptions += 1
        if requeue and self._swap_out(seq, plan):
            return
        self.kv.free(seq)
        seq.num_computed = 0
        self.recomputes += 1
        plan.preempted.append(seq)
        if requeue:
            self.waiting.appendleft(seq)

    def _swap_out(self, seq: Sequence, plan: StepPlan) -> bool:
        """Host blocks for the victim's computed positions, then drop its device blocks (the
        engine copies them out before the step runs, so their data is intact until then)."""
        if self.swap is None or seq.num_computed < self.swap_min_tokens:
            return False
        n = blocks_for_tokens(seq.num_computed, self.kv.block_size)
        host = self.swap.allocate(seq, n)
        if host is None:
            return False  # the swap space is full: recompute
        plan.swapped_out.append(SwapCopy(seq, tuple(self.kv.block_table(seq)[:n]), tuple(host)))
        self.kv.free(seq)  # shared blocks only lose this reference (copy-on-swap, swap_space.py)
        self.swapped.append(seq)
        self.swaps_out += 1
        return True

    def _swap_in(self, plan: StepPlan, budget: int) -> int:
        """Bring swapped sequences back, oldest first, while blocks allow; each runs this step
        (a decode row: its KV up to the last token is restored). Returns the budget left."""
        while self.swapped and budget > 0 and len(plan.work) < self.max_batch_size:
            seq = self.swapped[0]
            # a lone sequence takes what there is: nothing else would ever give it room
            reserve = self.swap_in_reserve if self.running else 0
            cached = self.kv.allocate(seq, seq.tokens, num_tokens=len(seq.tokens), reserve=reserve)
            if cached is None:
                break  # oldest first: later ones wait too
            host = self.swap.table(seq)
            first = cached // self.kv.block_size  # prefix blocks still cached on the device: not copied
            table = self.kv.block_table(seq)
            plan.swapped_in.append(SwapCopy(seq, tuple(table[first : len(host)]), tuple(host[first:])))
            self.swap.free(seq)
            self.swapped.popleft()
            self.swaps_in += 1
            self.running.append(seq)
            plan.work.append((seq, 1))
            budget -= 1
        return budget

    def _remove(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.swapped:
            self.swapped.remove(seq)
            self.swap.free(seq)
        else:
            self.running = [s for s in self.running if s is not seq]
