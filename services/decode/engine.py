"""The decode worker's model thread: continuous batching over a paged KV cache.

The event loop never touches the model. It reserves a seat and KV blocks for a sequence,
writes KV shipped by a prefill worker into those blocks, and adds, aborts or detaches
sequences; the engine thread runs `step()` (schedule -> execute -> postprocess) and hands
tokens back to the loop with one `call_soon_threadsafe` per step. Without a loop (offline
use: benchmarks, tests) tokens go straight into each sequence's outbox.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
import time
import weakref

import structlog
import torch

from ..common.stats import LatencyWindow, RateWindow
from ..engine.batch import SeqWork
from ..engine.block_manager import BlockManager, blocks_for_budget
from ..engine.host_kv_cache import HostKvCache
from ..engine.kv_cache import PagedKvCache, SlotPool
from ..engine.profile import ServiceTimeModel, StepProfile, StepRecord
from ..engine.runner import ModelRunner
from ..engine.swap_space import SwapSpace
from .scheduler import Scheduler, StepPlan
from .sequence import Sequence

log = structlog.get_logger(__name__)

SWITCH_INTERVAL_S = 0.0005
FIT_STEPS = 1024  # the step-time fit uses the newest steps: recent load, and cheap in pure Python
FIT_EVERY_S = 2.0  # refit at most this often (it runs on the event loop, from the load report)


class DecodeEngine:
    def __init__(
        self, runner: ModelRunner, num_seats: int, max_batch_size: int, loop: asyncio.AbstractEventLoop | None,
        kv_budget_bytes: int, block_size: int = 16, token_budget: int = 512, chunk_size: int = 0,
        swap_bytes: int = 0, swap_min_tokens: int = 1, mirror: bool = True,
    ):
        self.runner = runner
        self.loop = loop
        cfg = runner.config
        num_blocks = blocks_for_budget(kv_budget_bytes, PagedKvCache.block_bytes(cfg, block_size, runner.dtype))
        if num_blocks < 1:
            raise ValueError(f"a KV budget of {kv_budget_bytes} bytes holds no {block_size}-token block")
        self.kv = BlockManager(num_blocks, block_size)
        self.cache = PagedKvCache(cfg, num_blocks, block_size, runner.dtype, runner.device)
        self.slots = SlotPool(num_seats, cfg.max_model_len)  # seats: sequences admitted at once
        # a new sequence is admitted only if this many blocks stay free, so running ones can grow
        self.watermark_blocks = max(1, num_blocks // 50)
        block_bytes = PagedKvCache.block_bytes(cfg, block_size, runner.dtype)
        swap_blocks = blocks_for_budget(swap_bytes, block_bytes)
        self.swap = SwapSpace(swap_blocks, block_size) if swap_blocks else None  # None: preemption recomputes
        self.host_cache = None if self.swap is None else HostKvCache(
            cfg, swap_blocks, block_size, runner.dtype, pin=runner.device.type == "cuda")
        self.scheduler = Scheduler(self.kv, max_batch_size, token_budget, chunk_size, self.swap, swap_min_tokens,
                                   swap_in_reserve=self.watermark_blocks)
        self.mirror = mirror  # False: decode rows carry no sequence id, so the model's CPU mirror stays off
        # reserve() (event loop) must not take a block a swap-out freed before its KV is copied out
        self._admission = threading.Lock()
        self.max_seq_len = min(cfg.max_model_len, self.kv.capacity_tokens)
        self.on_slot_freed = lambda: None  # set by the worker; runs on the event loop
        self.step_ms = LatencyWindow()
        self.tokens_out = RateWindow()
        self.profile = StepProfile()
        self.steps_recorded = 0
        self._fit: tuple[float, int, ServiceTimeModel | None] = (0.0, 0, None)  # (when, steps seen, fit)
        self._seq_ids: weakref.WeakKeyDictionary[Sequence, int] = weakref.WeakKeyDictionary()
        self._next_seq_id = itertools.count()
        self._detaching: dict[int, tuple[Sequence, asyncio.Future]] = {}  # id(seq) -> waiter
        self._wakeup = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="decode-engine", daemon=True)

    def start(self) -> None:
        # The engine thread and the event loop share the GIL. With the default 5 ms switch
        # interval a busy event loop stalls the step for up to 5 ms per torch call.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    # ---- called from the event loop ----

    def reserve(self, seq: Sequence, num_tokens: int | None = None) -> bool:
        """A seat and KV blocks for seq.tokens (or its first num_tokens positions), reusing
        cached prefix blocks; sets seq.slot and seq.num_computed. False: no room now (or
        swapped-out sequences are waiting for blocks: they come back before new admissions)."""
        seat = self.slots.allocate()
        if seat is None:
            return False
        with self._admission:
            cached = None if self.scheduler.swapped else self.kv.allocate(
                seq, seq.tokens, num_tokens, reserve=self.watermark_blocks)
        if cached is None:
            self.slots.free(seat)
            return False
        seq.slot, seq.num_computed = seat, cached
        return True

    def write_kv(self, seq: Sequence, layer: int, kv: torch.Tensor) -> None:
        """kv [2, KVH, T, D] for positions [0, T) (shipped by a prefill worker or a peer);
        positions already held by shared prefix blocks are skipped."""
        self.cache.write(layer, self.kv.block_table(seq), kv, start=seq.num_computed)

    def kv_written(self, seq: Sequence, num_tokens: int) -> None:
        """Every layer's KV for positions [0, num_tokens) is in place."""
        seq.num_computed = num_tokens
        self.kv.commit(seq, seq.tokens, num_tokens)

    def read_kv(self, seq: Sequence, num_tokens: int) -> list[torch.Tensor]:
        """Per layer [2, KVH, num_tokens, D], contiguous (to hand a sequence to a peer)."""
        table = self.kv.block_table(seq)
        return [self.cache.read(layer, table, num_tokens) for layer in range(len(self.cache.k))]

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)
        self._wakeup.set()

    def abort(self, seq: Sequence) -> None:
        self.scheduler.abort(seq)
        self._wakeup.set()

    def detach(self, seq: Sequence) -> "asyncio.Future[bool]":
        """Take a running sequence out of the batch, keeping its seat and KV. The future says
        True once it is out, False if it finished or was aborted first."""
        fut = self.loop.create_future()
        self._detaching[id(seq)] = (seq, fut)
        self.scheduler.detach(seq)
        self._wakeup.set()
        return fut

    def release(self, seq: Sequence) -> None:
        """Give back a sequence's KV blocks and seat (either thread)."""
        if self.kv.has(seq):
            self.kv.free(seq)
        self.slots.free(seq.slot)
        self._notify_slot_freed()

    def _notify_slot_freed(self) -> None:
        if self.loop is None:
            self.on_slot_freed()
        else:
            self.loop.call_soon_threadsafe(self.on_slot_freed)

    @property
    def running(self) -> int:
        return len(self.scheduler.running) + len(self.scheduler.waiting) + len(self.scheduler.swapped)

    def step_model(self) -> ServiceTimeModel | None:
        """The step-time fit over the newest steps, refreshed at most every FIT_EVERY_S while
        steps keep coming; None until enough distinct steps were seen."""
        when, seen, fit = self._fit
        now = time.monotonic()
        steps = self.steps_recorded
        if steps != seen and (fit is None or now - when >= FIT_EVERY_S):  # no fit yet: retry at once
            self._fit = (now, steps, self.profile.fit(last=FIT_STEPS))
        return self._fit[2]

    @property
    def kv_used_tokens(self) -> int:
        return self.kv.num_used_blocks * self.kv.block_size

    # ---- the engine thread ----

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                try:
                    if not self.step():
                        self._wakeup.wait(timeout=0.1)
                        self._wakeup.clear()
                except Exception as exc:  # keep serving; the failed step's sequences are aborted
                    log.exception("decode.step_failed", error=repr(exc))
                    try:
                        self._fail_all()
                    except Exception as again:  # the thread must outlive it: a dead engine hangs every request
                        log.exception("decode.fail_all_failed", error=repr(again))

    def run_until_idle(self) -> None:
        """Offline use: step until every added sequence has finished."""
        with torch.inference_mode():
            while self.scheduler.has_work:
                self.step()

    def step(self) -> bool:
        """One scheduling round; returns False when there was nothing to do."""
        with self._admission:
            plan = self.scheduler.schedule()
            self._swap(plan)
        self._settle(plan)
        if not plan.work:
            return bool(plan.released)
        start = time.perf_counter()
        sampled = self.runner.execute([self._work(seq, n) for seq, n in plan.work], self.cache)
        self._postprocess(plan, sampled, start)
        return True

    def _swap(self, plan: StepPlan) -> None:
        """Copy swapped-out KV to the host, then swapped-in KV back (scheduler.py: all of a
        step's swap-ins come after its swap-outs). A preempted sequence's id is dropped: the
        model's decode mirror must not serve rows it cached before the preemption."""
        for c in plan.swapped_out:
            self.host_cache.swap_out(self.cache, c.device_blocks, c.host_blocks)
        for c in plan.swapped_in:
            if c.device_blocks:  # empty: every block was still cached on the device
                self.host_cache.swap_in(self.cache, c.host_blocks, c.device_blocks)
        for seq in itertools.chain(plan.preempted, (c.seq for c in plan.swapped_out)):
            self._seq_ids.pop(seq, None)
        if plan.swapped_in and not self.scheduler.swapped:  # admissions held back for them may go on
            self._notify_slot_freed()

    def _work(self, seq: Sequence, n: int) -> SeqWork:
        done = seq.num_computed
        seq_id = self._seq_ids.get(seq, -1)
        if seq_id < 0 and self.mirror:  # ids are never reused, so the model can keep a sequence's KV rows across steps
            seq_id = self._seq_ids[seq] = next(self._next_seq_id)
        return SeqWork(
            seq.tokens[done : done + n], done, self.kv.block_table(seq), sample=done + n == len(seq.tokens),
            params=seq.params, seed=seq.seed, sample_index=seq.sample_index, seq_id=seq_id,
        )

    def _settle(self, plan: StepPlan) -> None:
        for seq in plan.released:
            self.release(seq)
            self._settle_detach(seq, False)
        for seq in plan.detached:
            self._settle_detach(seq, True)

    def _postprocess(self, plan: StepPlan, sampled: list[int | None], start: float) -> None:
        context = sum(seq.num_computed + n for seq, n in plan.work)
        grew = self.scheduler.update(plan, sampled)
        deliveries = [(seq.outbox, seq.tokens[-1], seq.finish_reason) for seq in grew]
        for seq in grew:
            if seq.finish_reason:
                self.release(seq)
                self._settle_detach(seq, False)
        ms = (time.perf_counter() - start) * 1000
        decode = sum(1 for _, n in plan.work if n == 1)
        self.profile.record(StepRecord(time.time(), len(plan.work), decode, plan.num_tokens - decode, context, ms))
        self.steps_recorded += 1
        self.step_ms.add(ms)
        self.tokens_out.add(len(grew))
        self._deliver(deliveries)

    def _deliver(self, deliveries) -> None:
        if self.loop is None:
            _deliver(deliveries)
        else:
            self.loop.call_soon_threadsafe(_deliver, deliveries)

    def _settle_detach(self, seq: Sequence, detached: bool) -> None:
        waiter = self._detaching.pop(id(seq), None)
        if waiter is not None:
            self.loop.call_soon_threadsafe(_resolve, waiter[1], detached)

    def _fail_all(self) -> None:
        failed = list(self.scheduler.running) + list(self.scheduler.waiting) + list(self.scheduler.swapped)
        self.scheduler.finish(failed)
        for seq in failed:
            self.release(seq)
        self._deliver([(s.outbox, None, "error") for s in failed])


def _resolve(fut: asyncio.Future, value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


def _deliver(deliveries) -> None:
    for outbox, token, finish in deliveries:
        outbox.put_nowait((token, finish))
