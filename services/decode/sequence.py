"""A sequence in the decode worker's running batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..common.types import FinishReason, SamplingParams


@dataclass(eq=False)
class Sequence:
    request_id: str
    slot: int  # the seat this sequence holds (the concurrency limit); its KV is in paged blocks
    tokens: list[int]  # prompt + output so far
    prompt_len: int
    params: SamplingParams
    seed: int
    eos_ids: frozenset[int]
    max_len: int  # most tokens it may reach (the model's context, capped by the KV pool)
    sampling_offset: int = 0  # output index of tokens[prompt_len] in the client's request
    num_computed: int = 0  # leading tokens whose K/V is in the cache (or swap space); running: len(tokens) - 1
    preemptions: int = 0
    outbox: Any = field(default=None, repr=False)  # asyncio.Queue of (token, finish_reason)
    aborted: bool = False
    detach_requested: bool = False  # leave the running batch but keep the slot (migration)
    finish_reason: str | None = None

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def sample_index(self) -> int:
        """Output index (in the client's request) of the token the next step samples."""
        return self.sampling_offset + self.generated

    @property
    def position(self) -> int:
        """Where the K/V of tokens[-1] is written when it is fed (running sequences)."""
        return len(self.tokens) - 1

    def finish_for(self, token: int) -> str | None:
        """The finish reason once `token` has been appended, or None to go on."""
        if token in self.params.stop_token_ids or (token in self.eos_ids and not self.params.ignore_eos):
            return FinishReason.STOP
        if self.generated >= self.params.max_tokens or len(self.tokens) >= self.max_len:
            return FinishReason.LENGTH
        return None
