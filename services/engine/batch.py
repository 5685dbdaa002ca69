"""One engine step's input: the new tokens of every scheduled sequence, flattened.

A step mixes decode rows (one new token, attending to everything before it) and prefill
chunks (n new tokens starting at an offset, attending to the cached prefix and causally to
each other). All tokens go through the projections and MLPs as one [N, hidden] matrix;
only attention is grouped: decode rows together, each chunk on its own. Index tensors are
built on the host once per step and moved with one copy each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..common.types import SamplingParams


@dataclass
class SeqWork:
    """What one sequence contributes to a step."""

    tokens: list[int]  # the new tokens, at positions start .. start + len - 1
    start: int  # tokens before this already have KV in the cache
    table: list[int]  # block table, covering at least start + len(tokens) positions
    sample: bool  # wants a next token from the logits of its last new token
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    sample_index: int = 0  # output index of the sampled token in the client's request


@dataclass
class Chunk:
    row: int  # first row of the chunk in the flattened batch
    n: int
    table: torch.Tensor | None  # [blocks] long; None: the chunk starts at position 0
    mask: torch.Tensor | None  # [1, 1, n, blocks * block_size] bool: which cached keys each row sees


@dataclass
class StepBatch:
    tokens: torch.Tensor  # [N] long
    positions: torch.Tensor  # [N] long
    slot_ids: torch.Tensor  # [N] long: where each new token's K/V is written
    num_decode: int  # rows [0, num_decode) are one-token decode rows
    decode_tables: torch.Tensor | None  # [num_decode, blocks] long (padded with block 0)
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, blocks * block_size] bool
    chunks: list[Chunk]
    logit_rows: torch.Tensor  # [R] rows whose logits are sampled
    sampled: list[int]  # input indices of the items that sample, in logit_rows order


def build_batch(work: list[SeqWork], block_size: int, device: torch.device) -> StepBatch:
    # decode rows first so their attention is one batched call
    order = sorted(range(len(work)), key=lambda i: len(work[i].tokens) != 1)
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logit_rows: list[int] = []
    sampled: list[int] = []
    num_decode = sum(1 for w in work if len(w.tokens) == 1)
    dec_tables: list[list[int]] = []
    dec_lens: list[int] = []
    chunks: list[Chunk] = []
    for i in order:
        w = work[i]
        row = len(tokens)
        n = len(w.tokens)
        tokens.extend(w.tokens)
        for p in range(w.start, w.start + n):
            positions.append(p)
            slots.append(w.table[p // block_size] * block_size + p % block_size)
        if w.sample:
            logit_rows.append(row + n - 1)
            sampled.append(i)
        used = w.table[: -(-(w.start + n) // block_size)]  # blocks holding positions < start + n
        if n == 1:
            dec_tables.append(used)
            dec_lens.append(w.start + 1)
        elif w.start == 0:  # nothing cached before it: plain causal attention over its own K/V
            chunks.append(Chunk(row, n, None, None))
        else:
            keys = torch.arange(len(used) * block_size)
            queries = torch.arange(w.start, w.start + n)
            mask = (keys[None, :] <= queries[:, None])[None, None]  # causal, offset by the cached prefix
            chunks.append(Chunk(row, n, torch.tensor(used, device=device), mask.to(device)))
    decode_tables = decode_mask = None
    if num_decode:
        width = max(len(t) for t in dec_tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in dec_tables])  # [Dd, blocks]
        keys = torch.arange(width * block_size)
        decode_mask = (keys[None, :] < torch.tensor(dec_lens)[:, None])[:, None, None].to(device)
        decode_tables = padded.to(device)
    return StepBatch(
        tokens=torch.tensor(tokens, device=device),
        positions=torch.tensor(positions, device=device),
        slot_ids=torch.tensor(slots, device=device),
        num_decode=num_decode,
        decode_tables=decode_tables,
        decode_mask=decode_mask,
        chunks=chunks,
        logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=device),
        sampled=sampled,
    )
