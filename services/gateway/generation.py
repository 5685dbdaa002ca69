"""One request through the pipeline, as text deltas: detokenization and stop strings."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..common.types import FinishReason, GenerationRequest
from ..proto import inference_pb2 as pb
from .detokenizer import IncrementalDetokenizer
from .pipeline import Pipeline


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class RequestStats:
    start: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    completion_tokens: int = 0
    timings: pb.StageTimings | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.start


async def generate(
    pipeline: Pipeline, tokenizer, req: GenerationRequest, timeout_s: float, stats: RequestStats
) -> AsyncIterator[Delta]:
    """Yield text deltas; the last one has a finish_reason. A stop string ends the request
    early: the upstream stream is cancelled, which frees the decode sequence at once."""
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=req.prompt_token_ids, stop=req.stop)
    stream = pipeline.stream(req, timeout_s)
    try:
        async for event in stream:
            if stats.first_token_at is None:
                stats.first_token_at = time.monotonic()
            if event.timings is not None and event.timings.ByteSize():
                stats.timings = event.timings
            stats.completion_tokens += len(event.token_ids)
            text = detok.push(event.token_ids)
            if detok.stopped:
                yield Delta(text, event.token_ids, FinishReason.STOP)
                return
            if event.finish_reason:
                yield Delta(text + detok.flush(), event.token_ids, event.finish_reason)
                return
            if text or event.token_ids:
                yield Delta(text, event.token_ids, None)
    finally:
        await stream.aclose()
