"""Token selection for a whole batch in tensor ops on the logits' device: greedy, or
temperature / top-k / top-p. The only host sync is reading the chosen ids back.

Seeded sampling without per-row generators: token `index` of a request with base `seed`
draws its noise from a counter-based hash of (token_seed(seed, index), vocabulary id), and
picks argmax(filtered logits + Gumbel noise), which is a draw from the filtered softmax. The
noise of a row depends on nothing else in the batch, and integer hashing gives the same bits
on every device, so a seeded request yields the same tokens whatever batch it shares and
whichever worker produces token i.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..common.types import SamplingParams

_MASK63 = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # splitmix64 constants as signed int64
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def token_seed(seed: int, index: int) -> int:
    """The noise key for output token `index` of a request with base `seed`."""
    return (seed * 6364136223846793005 + index * 1442695040888963407 + 1) & _MASK63


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic on signed ints)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _uniform(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """keys [R, 1], ids [R, V] int64 -> uniforms in (0, 1) [R, V] float64 (splitmix64 of
    key + golden * id; int64 multiplication wraps as the hash expects)."""
    x = keys + ids * _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return (_shr(x, 11).double() + 0.5) * (1.0 / (1 << 53))


def _sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], keys: Sequence[int]) -> torch.Tensor:
    """logits [R, V] float32 of rows that sample -> token ids [R] on the same device."""
    dev = logits.device
    v = logits.shape[-1]
    knobs = torch.tensor([[p.temperature, p.top_k if 0 < p.top_k < v else v, p.top_p] for p in params],
                         dtype=torch.float64).to(dev)  # [R, 3]: one copy in
    temperature, top_k, top_p = knobs[:, :1].float(), knobs[:, 1:2].long(), knobs[:, 2:]
    scaled, order = (logits / temperature).sort(dim=-1, descending=True)  # [R, V] best first
    kth = scaled.gather(1, top_k - 1)  # [R, 1]: ties with the k-th best stay in, as topk would keep them
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    before = probs.cumsum(-1) - probs  # mass strictly above each token
    # top_p 1 keeps everything even where the cumulative sum rounds past 1
    drop = (before >= top_p) & (top_p < 1.0)
    scaled = scaled.masked_fill(drop, float("-inf"))
    key = torch.tensor(list(keys), dtype=torch.long).to(dev)[:, None]  # [R, 1]
    gumbel = -torch.log(-torch.log(_uniform(key, order)))  # noise of each vocabulary id, in sorted order
    choice = (scaled.double() + gumbel).argmax(-1, keepdim=True)  # [R, 1]
    return order.gather(1, choice)[:, 0]


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int], indices: Sequence[int]) -> list[int]:
    """logits [B, V] float32; row b uses params[b], and is output token indices[b] of its request."""
    ids = logits.argmax(dim=-1)  # [B]
    rows = [b for b, p in enumerate(params) if not p.greedy]
    if rows:
        picked = torch.tensor(rows, dtype=torch.long).to(logits.device)
        drawn = _sample_rows(logits.index_select(0, picked), [params[b] for b in rows],
                             [token_seed(seeds[b], indices[b]) for b in rows])
        ids = ids.index_copy(0, picked, drawn)
    return ids.tolist()  # the step's one host sync
