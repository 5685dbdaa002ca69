"""The decode worker's model thread: continuous batching over a slot-indexed KV cache.

The event loop never touches the model. It adds sequences, aborts them, and queues local
prefill jobs; the engine thread runs `step()` and hands tokens back to the loop with one
`call_soon_threadsafe` per step.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future

import structlog
import torch

from ..common.stats import LatencyWindow, RateWindow
from ..common.types import SamplingParams
from ..engine.kv_cache import KvCache, SlotPool
from ..engine.runner import ModelRunner, PrefillOutput
from ..engine.sampler import sample
from .scheduler import Scheduler
from .sequence import Sequence

log = structlog.get_logger(__name__)

SWITCH_INTERVAL_S = 0.0005


class DecodeEngine:
    def __init__(self, runner: ModelRunner, num_slots: int, max_batch_size: int, loop: asyncio.AbstractEventLoop):
        self.runner = runner
        self.loop = loop
        self.slot_tokens = runner.config.max_model_len
        self.slots = SlotPool(num_slots, self.slot_tokens)
        self.cache = KvCache(runner.config, num_slots, self.slot_tokens, runner.dtype, runner.device)
        self.scheduler = Scheduler(max_batch_size)
        self.on_slot_freed = lambda: None  # set by the worker; runs on the event loop
        self.step_ms = LatencyWindow()
        self.tokens_out = RateWindow()
        self.steps: deque[tuple[float, int, int, float]] = deque(maxlen=4096)  # (time, batch, context, ms)
        self._detaching: dict[int, tuple[Sequence, asyncio.Future]] = {}  # id(seq) -> waiter
        self._jobs: deque[tuple[Future, list[int], SamplingParams, int, int]] = deque()
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

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)
        self._wakeup.set()

    def abort(self, seq: Sequence) -> None:
        self.scheduler.abort(seq)
        self._wakeup.set()

    def detach(self, seq: Sequence) -> "asyncio.Future[bool]":
        """Take a running sequence out of the batch, keeping its slot and KV. The future says
        True once it is out, False if it finished or was aborted first."""
        fut = self.loop.create_future()
        self._detaching[id(seq)] = (seq, fut)
        self.scheduler.detach(seq)
        self._wakeup.set()
        return fut

    def _settle_detach(self, seq: Sequence, detached: bool) -> None:
        waiter = self._detaching.pop(id(seq), None)
        if waiter is not None:
            self.loop.call_soon_threadsafe(_resolve, waiter[1], detached)

    def prefill(self, prompt: list[int], params: SamplingParams, seed: int, offset: int = 0) -> "asyncio.Future[PrefillOutput]":
        """Prefill a prompt on this worker, between decode steps."""
        fut: Future = Future()
        self._jobs.append((fut, prompt, params, seed, offset))
        self._wakeup.set()
        return asyncio.wrap_future(fut, loop=self.loop)

    def free_slot(self, slot: int) -> None:
        self.slots.free(slot)
        self.loop.call_soon_threadsafe(self.on_slot_freed)

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

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
                    self._fail_running(exc)

    def step(self) -> bool:
        """One scheduling round; returns False when there was nothing to do."""
        self._run_prefill_jobs()
        batch, released = self.scheduler.schedule()
        for seq in released:
            self.free_slot(seq.slot)
            self._settle_detach(seq, False)
        for seq in self.scheduler.detached:
            self._settle_detach(seq, True)
        if not batch:
            return bool(released)
        start = time.perf_counter()
        tokens = self._execute(batch)
        self._postprocess(batch, tokens)
        ms = (time.perf_counter() - start) * 1000
        self.step_ms.add(ms)
        self.steps.append((time.time(), len(batch), max(s.position for s in batch) + 1, ms))
        return True

    def _execute(self, batch: list[Sequence]) -> list[int]:
        dev = self.runner.device
        tokens = torch.tensor([s.tokens[-1] for s in batch], device=dev)  # [B]
        positions = torch.tensor([s.position for s in batch], device=dev)  # [B]
        slot_ids = [s.slot for s in batch]
        slots = torch.tensor(slot_ids, device=dev)  # [B]
        span = max(s.position for s in batch) + 1
        logits = self.runner.model.decode(
            tokens, positions, slots, self.cache, (min(slot_ids), max(slot_ids) + 1), span
        )  # [B, V]
        return sample(logits, [s.params for s in batch], [s.seed for s in batch], [s.sample_index for s in batch])

    def _postprocess(self, batch: list[Sequence], tokens: list[int]) -> None:
        deliveries, finished = [], []
        for seq, token in zip(batch, tokens):
            seq.tokens.append(token)
            seq.finish_reason = seq.finish_for(token)
            deliveries.append((seq.outbox, token, seq.finish_reason))
            if seq.finish_reason:
                finished.append(seq)
        self.scheduler.finish(finished)
        for seq in finished:
            self.free_slot(seq.slot)
            self._settle_detach(seq, False)
        self.tokens_out.add(len(batch))
        self.loop.call_soon_threadsafe(_deliver, deliveries)

    def _run_prefill_jobs(self) -> None:
        while self._jobs:
            fut, prompt, params, seed, offset = self._jobs.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(self.runner.prefill([prompt], [params], [seed], [offset])[0])
            except Exception as exc:
                fut.set_exception(exc)

    def _fail_running(self, exc: Exception) -> None:
        failed = list(self.scheduler.running)
        self.scheduler.finish(failed)
        for seq in failed:
            self.free_slot(seq.slot)
        self.loop.call_soon_threadsafe(_deliver, [(s.outbox, None, "error") for s in failed])


def _resolve(fut: asyncio.Future, value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


def _deliver(deliveries) -> None:
    for outbox, token, finish in deliveries:
        outbox.put_nowait((token, finish))
