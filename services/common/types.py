"""Typed objects that cross service seams (converted from protobuf once, at the servicer)."""

from __future__ import annotations

from dataclasses import dataclass, field


class FinishReason:
    """Why a sequence stopped; the strings are the OpenAI ones where OpenAI has one."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # cancelled by the client or by a drain


MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. temperature 0 (or below MIN_TEMPERATURE) means greedy.

    `seed` fixes the random stream: token i of a request is drawn from a generator
    seeded with (seed, i), so a seeded request gives the same tokens whatever batch
    it shares and whichever worker produces token i.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        # Below this, dividing logits by the temperature overflows float32; the limit of
        # sampling as the temperature goes to 0 is greedy anyway.
        return self.temperature < MIN_TEMPERATURE


@dataclass(frozen=True)
class GenerationRequest:
    """A request after the gateway has tokenized and validated it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()  # stop strings, matched on detokenized text by the gateway
    timeout_s: float = 0.0  # 0: the gateway's default end-to-end timeout
