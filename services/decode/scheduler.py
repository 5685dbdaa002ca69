"""Continuous batching: which running sequences take part in the next decode step.

Pure bookkeeping, no torch. The event loop adds and aborts; the engine thread schedules
and finishes, so the two hand-off lists are guarded by a lock.
"""

from __future__ import annotations

import threading

from .sequence import Sequence


class Scheduler:
    def __init__(self, max_batch_size: int):
        self.max_batch_size = max_batch_size
        self.running: list[Sequence] = []
        self.detached: list[Sequence] = []  # left the batch at the last schedule(), slots kept
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
        return bool(self.running or self._arrivals)

    def schedule(self) -> tuple[list[Sequence], list[Sequence]]:
        """Return (batch for this step, sequences to release).

        Invariants: a sequence is in `running` from the step after it arrives until it
        finishes, is aborted or is detached; an aborted sequence is released exactly once and
        never stepped again; a detached one leaves with its slot (listed in `detached`); the batch holds at most max_batch_size sequences, each once. When more
        are running than fit, the batch rotates so every sequence advances in turn.
        """
        with self._lock:
            self.running.extend(self._arrivals)
            self._arrivals.clear()
        released = [s for s in self.running if s.aborted]
        self.detached = [s for s in self.running if s.detach_requested and not s.aborted]
        if released or self.detached:
            self.running = [s for s in self.running if not (s.aborted or s.detach_requested)]
        batch = self.running[: self.max_batch_size]
        if len(self.running) > self.max_batch_size:
            self.running = self.running[self.max_batch_size :] + batch
        return batch, released

    def finish(self, finished: list[Sequence]) -> None:
        gone = set(map(id, finished))
        self.running = [s for s in self.running if id(s) not in gone]
