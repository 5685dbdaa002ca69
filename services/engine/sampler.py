"""Token selection: greedy, or temperature / top-k / top-p with a per-token seeded generator."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..common.types import SamplingParams

_MASK63 = (1 << 63) - 1


def token_seed(seed: int, index: int) -> int:
    """The generator seed for output token `index` of a request with base `seed`."""
    return (seed * 6364136223846793005 + index * 1442695040888963407 + 1) & _MASK63


def _sample_row(logits: torch.Tensor, params: SamplingParams, seed: int, index: int) -> int:
    """logits [V] -> one token id."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass strictly above each token
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    gen = torch.Generator(device=logits.device).manual_seed(token_seed(seed, index))
    return int(torch.multinomial(probs, 1, generator=gen))


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int], indices: Sequence[int]) -> list[int]:
    """logits [B, V] float32; row b uses params[b], and is output token indices[b] of its request."""
    out = logits.argmax(dim=-1).tolist()  # the one host sync of a greedy step
    for b, p in enumerate(params):
        if not p.greedy:
            out[b] = _sample_row(logits[b], p, seeds[b], indices[b])
    return out
