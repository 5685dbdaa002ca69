"""Prompt queue and micro-batching: the prefill worker's hot loop."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..common.stats import LatencyWindow, RateWindow
from ..common.types import SamplingParams
from ..engine.runner import ModelRunner, PrefillOutput


class QueueFull(Exception):
    pass


@dataclass
class PrefillJob:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    future: asyncio.Future = field(repr=False)
    offset: int = 0  # output index of the token sampled here
    # called on the model thread with (layer, KV [2, KVH, T, D]) as each layer is computed
    on_kv: Callable[[int, torch.Tensor], None] | None = field(default=None, repr=False)
    enqueued_at: float = field(default_factory=time.monotonic)
    queue_ms: float = 0.0
    compute_ms: float = 0.0


class PrefillBatcher:
    def __init__(self, runner: ModelRunner, max_batch_size: int, max_batch_tokens: int, max_queue: int):
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self._queue: deque[PrefillJob] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-model")
        self.tokens_in = RateWindow()
        self.batch_ms = LatencyWindow()

    def submit(self, job: PrefillJob) -> None:
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"prefill queue is full ({self.max_queue} prompts)")
        self._queue.append(job)
        self._wakeup.set()

    @property
    def queue_len(self) -> int:
        return len(self._queue)

    @property
    def queued_tokens(self) -> int:
        return sum(len(j.prompt) for j in self._queue)

    def _next_batch(self) -> list[PrefillJob]:
        """Oldest first, while the padded batch stays within max_batch_size and max_batch_tokens."""
        batch: list[PrefillJob] = []
        longest = 0
        while self._queue and len(batch) < self.max_batch_size:
            job = self._queue[0]
            if job.future.done():  # cancelled while queued
                self._queue.popleft()
                continue
            longest_if_added = max(longest, len(job.prompt))
            if batch and longest_if_added * (len(batch) + 1) > self.max_batch_tokens:
                break
            batch.append(self._queue.popleft())
            longest = longest_if_added
        return batch

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            batch = self._next_batch()
            if not batch:
                self._wakeup.clear()
                continue
            start = time.monotonic()
            for job in batch:  # known now, so the KV stream's head can carry it
                job.queue_ms = (start - job.enqueued_at) * 1000
            try:
                outputs = await loop.run_in_executor(self._executor, self._execute, batch)
            except Exception as exc:  # a model failure fails this batch, not the worker
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            done = time.monotonic()
            self.batch_ms.add((done - start) * 1000)
            self.tokens_in.add(sum(len(j.prompt) for j in batch))
            for job, out in zip(batch, outputs):
                job.compute_ms = (done - start) * 1000
                if not job.future.done():
                    job.future.set_result(out)

    def _execute(self, batch: list[PrefillJob]) -> list[PrefillOutput]:
        def on_layer(layer: int, kv: list[torch.Tensor]) -> None:
            for job, prompt_kv in zip(batch, kv):
                if job.on_kv is not None:
                    job.on_kv(layer, prompt_kv)

        return self.runner.prefill(
            [j.prompt for j in batch], [j.params for j in batch], [j.seed for j in batch], [j.offset for j in batch],
            on_layer=on_layer,
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
