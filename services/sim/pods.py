"""Simulated worker pods: a prefill pod micro-batches prompts, a decode pod batches continuously. Pure.

Both are passive: the simulator calls them at event times and reads back when they next need
an event (`next_event`). A decode pod advances in segments: while its batch does not change,
every step takes the same time, so many steps are settled in one event (the next finish, or the
step boundary at which waiting sequences join), not one event per token. An expert-group pod
(MoE) is a plain Pod: its load and latency live with its group (services/sim/moe.py).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .profile import DecodeModel, PrefillModel

STARTING, READY, DRAINING, GONE = "starting", "ready", "draining", "gone"
_EPS = 1e-9


@dataclass(eq=False)
class Pod:
    pod_id: int
    stage: str
    share: float
    created_at: float
    gpu: int | None = None  # None: not placed yet (no GPU has room)
    state: str = STARTING
    ready_at: float = math.inf
    gone_at: float = math.inf
    version: int = 0  # bumped whenever the pod's scheduled event changes (older ones are stale)
    scheduled: float | None = None  # when its pending event fires (decode pods)

    @property
    def accepting(self) -> bool:
        return self.state == READY


@dataclass(eq=False)
class PrefillPod(Pod):
    model: PrefillModel | None = None
    max_batch_tokens: int = 4096
    max_batch_size: int = 16
    queue: deque = field(default_factory=deque)  # request ids
    queued_tokens: int = 0
    busy_until: float = -math.inf
    running: list[int] = field(default_factory=list)

    def idle(self) -> bool:
        return not self.running and not self.queue

    def start_batch(self, now: float, prompt: list[int], slow: float = 1.0,
                    experts: Callable[[int], float] | None = None) -> float | None:
        """Take a micro-batch off the queue if idle; returns when it ends (None: nothing to do).
        `slow` stretches the batch (CPU contention on a shared host); `experts` (MoE) gives the
        seconds the batch's tokens wait on the expert groups."""
        if self.running or not self.queue:
            return None
        tokens = tokens_sq = 0
        while self.queue and len(self.running) < self.max_batch_size:
            length = prompt[self.queue[0]]
            if self.running and tokens + length > self.max_batch_tokens:
                break
            rid = self.queue.popleft()
            self.running.append(rid)
            tokens += length
            tokens_sq += length * length
        self.queued_tokens -= tokens
        self.busy_until = now + self.model.batch_ms(tokens, tokens_sq, len(self.running), self.share) * slow / 1000.0
        if experts is not None:
            self.busy_until += experts(tokens)
        return self.busy_until

    def finish_batch(self) -> list[int]:
        done, self.running = self.running, []
        return done


@dataclass(eq=False)
class DecodePod(Pod):
    model: DecodeModel | None = None
    max_batch_size: int = 64
    kv_capacity: int = 0
    kv_reserved: int = 0  # tokens reserved by admitted sequences (waiting or running)
    admitted: int = 0  # sequences holding a slot (waiting for prefill or running)
    steps: int = 0  # steps completed at seg_start
    seg_start: float = 0.0
    dt: float = 0.0  # the current segment's step time (s)
    finishing: list = field(default_factory=list)  # heap of (finish step, request id)
    ctx_const: int = 0  # sum over running of (prompt + 1 - join step): context = ctx_const + B * steps
    joins: list = field(default_factory=list)  # heap of (ready time, request id)
    tokens_out: int = 0
    _step: object = None  # the model's step time at this pod's share

    @property
    def batch(self) -> int:
        return len(self.finishing)

    def has_room(self, kv_tokens: int) -> bool:
        return self.admitted < self.max_batch_size and self.kv_reserved + kv_tokens <= self.kv_capacity

    def admit(self, kv_tokens: int) -> None:
        self.admitted += 1
        self.kv_reserved += kv_tokens

    def release(self, kv_tokens: int) -> None:
        self.admitted -= 1
        self.kv_reserved -= kv_tokens

    def context_tokens(self) -> int:
        return self.ctx_const + self.batch * self.steps

    def next_event(self) -> float:
        """The next step boundary where something happens: a sequence finishes or joins."""
        t = math.inf
        if self.finishing:
            t = self.seg_start + (self.finishing[0][0] - self.steps) * self.dt
        if self.joins:
            ready = self.joins[0][0]
            if not self.finishing:
                t = min(t, ready)
            else:
                t = min(t, self.seg_start + math.ceil((ready - self.seg_start) / self.dt - _EPS) * self.dt)
        return t

    def advance(self, now: float) -> tuple[int, float]:
        """Settle the steps completed by `now` (a step boundary); returns (steps, step time)."""
        if not self.finishing:
            self.seg_start = now
            return 0, 0.0
        n = max(int(round((now - self.seg_start) / self.dt)), 0)
        self.steps += n
        self.seg_start = now
        self.tokens_out += n * self.batch
        return n, self.dt

    def pop_finished(self) -> list[int]:
        done = []
        while self.finishing and self.finishing[0][0] <= self.steps:
            done.append(heapq.heappop(self.finishing)[1])
        return done

    def join(self, rid: int, prompt_tokens: int, remaining: int) -> None:
        heapq.heappush(self.finishing, (self.steps + remaining, rid))
        self.ctx_const += prompt_tokens + 1 - self.steps

    def leave(self, prompt_tokens: int, join_step: int) -> None:
        self.ctx_const -= prompt_tokens + 1 - join_step

    def retime(self, slow: float = 1.0, experts_s: float = 0.0) -> None:
        """Set the segment's step time for the current batch; `slow` stretches it (host contention),
        `experts_s` is what each step waits on the expert groups (MoE: on other devices, not stretched)."""
        if self.finishing:
            if self._step is None:
                self._step = self.model.stepper(self.share)
            self.dt = self._step(len(self.finishing), self.ctx_const + len(self.finishing) * self.steps) * slow / 1000.0
            if experts_s:
                self.dt += experts_s
