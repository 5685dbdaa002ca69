"""Continuous batching with chunked prefill and preemption, under a per-step token budget.

Pure bookkeeping, no torch: what each sequence computes in the next step, and which KV
blocks it holds (through the BlockManager). The event loop adds, aborts and detaches; the
engine thread schedules and updates, so the arrivals hand-off is guarded by a lock.

A sequence is either running (KV computed for every token but the last, which the next
step feeds: one token per step) or waiting (tokens still to compute: a prompt prefilled
here, or prompt + output recomputed after a preemption; fed in chunks).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from ..engine.block_manager import BlockManager
from .sequence import Sequence


@dataclass
class StepPlan:
    work: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens this step)
    released: list[Sequence] = field(default_factory=list)  # aborted: the engine frees their seat and KV
    detached: list[Sequence] = field(default_factory=list)  # left the batch keeping their KV (migration)
    preempted: list[Sequence] = field(default_factory=list)  # KV freed, requeued to recompute

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.work)


class Scheduler:
    def __init__(self, kv: BlockManager, max_batch_size: int, token_budget: int, chunk_size: int = 0):
        self.kv = kv
        self.max_batch_size = max_batch_size
        self.token_budget = token_budget
        self.chunk_size = chunk_size  # 0: a prompt takes whatever budget is left
        self.running: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.preemptions = 0
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
        return bool(self.running or self.waiting or self._arrivals)

    def schedule(self) -> StepPlan:
        """Plan the next step.

        Invariants: every sequence is in exactly one of arrivals, running, waiting, or none
        (finished, released, detached); an aborted one is released exactly once and never
        stepped again; a detached one leaves running with its KV. A step holds at most
        max_batch_size sequences, each once, and at most token_budget tokens; every running
        sequence in the step gets its one token before any prompt chunk, so a long prompt
        delays running sequences by at most one chunk; each chunk is at most chunk_size.
        Every scheduled sequence has KV blocks for all the positions it computes; when the
        pool runs short the most recently scheduled running sequence (then waiting ones
        holding blocks) is preempted: its blocks are freed and it is requeued to recompute.
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
        for seq in list(self.waiting):
            if budget <= 0 or len(plan.work) >= self.max_batch_size:
                break
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
        plan.released = [s for s in self.running if s.aborted] + [s for s in self.waiting if s.aborted]
        plan.detached = [s for s in self.running if s.detach_requested and not s.aborted]
        if plan.released or plan.detached:
            self.running = [s for s in self.running if not (s.aborted or s.detach_requested)]
            self.waiting = deque(s for s in self.waiting if not s.aborted)

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
        """Recompute later: drop the KV, keep the tokens (and so the sampling indices)."""
        self.kv.free(seq)
        seq.num_computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        plan.preempted.append(seq)
        if requeue:
            self.waiting.appendleft(seq)

    def _remove(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        else:
            self.running = [s for s in self.running if s is not seq]
