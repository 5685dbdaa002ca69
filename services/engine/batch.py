"""One engine step's input: the new tokens of every scheduled sequence, flattened.

A step mixes decode rows (one new token, attending to everything before it) and prefill
chunks (n new tokens starting at an offset, attending to the cached prefix and causally to
each other). All tokens go through the projections and MLPs as one [N, hidden] matrix;
attention runs in at most three batched calls, whatever the number of sequences: every
decode row in one; every chunk over a cached prefix (padded to the longest) in another; every
chunk from position 0 in a third, causal over its own new K/V (no gather, no mask, so the
kernel skips the upper triangle). Everything a group needs (which
pool blocks to gather, which queries to pick, the additive mask) is built here on the host,
once per step, moved with one copy per tensor and reused by every layer.
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
    seq_id: int = -1  # unique for the sequence's life in its engine; -1: unknown (no KV reuse across steps)


@dataclass
class AttentionGroup:
    """Sequences whose attention runs as one call: B sequences, T query rows each (padded),
    keys gathered from `blocks` as [B, width * block_size]."""

    size: int  # B
    q_len: int  # T: 1 for decode rows, the longest chunk for prefill chunks
    width: int  # blocks per sequence after padding (short tables padded with block 0, masked)
    blocks: torch.Tensor | None  # [B * width] long: pool block ids, row-major (None: fresh chunks)
    mask: torch.Tensor | None  # [B, 1, T, width * block_size] float: 0 where a query sees a key, -inf elsewhere
    rows: torch.Tensor | None  # [B * T] long: batch row of each padded query (None: rows 0..B-1)
    outputs: torch.Tensor | None  # [sum n] long: which of the B * T results are real, in batch row order
    dest: torch.Tensor | None  # [sum n] long: the batch rows those real results belong to
    seq_ids: tuple[int, ...]  # per sequence, host side (see decode_mirror.py)
    starts: tuple[int, ...]  # first new position per sequence
    tables: list[list[int]]  # blocks per sequence, unpadded


@dataclass
class StepBatch:
    tokens: torch.Tensor  # [N] long
    positions: torch.Tensor  # [N] long
    slot_ids: torch.Tensor  # [N] long: where each new token's K/V is written
    num_decode: int  # rows [0, num_decode) are one-token decode rows; chunk rows follow
    decode: AttentionGroup | None
    prefill: AttentionGroup | None  # chunks after a cached prefix
    fresh: AttentionGroup | None  # chunks from position 0: causal over their own K/V
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
    decode: list[tuple[list[int], int, int, int, int]] = []  # (blocks, first row, start, n, seq_id)
    chunks: list[tuple[list[int], int, int, int, int]] = []
    fresh: list[tuple[list[int], int, int, int, int]] = []
    for i in order:
        w = work[i]
        row = len(tokens)
        n = len(w.tokens)
        tokens.extend(w.tokens)
        positions.extend(range(w.start, w.start + n))
        slots.extend(w.table[p // block_size] * block_size + p % block_size for p in range(w.start, w.start + n))
        if w.sample:
            logit_rows.append(row + n - 1)
            sampled.append(i)
        used = w.table[: -(-(w.start + n) // block_size)]  # blocks holding positions < start + n
        (decode if n == 1 else fresh if w.start == 0 else chunks).append((used, row, w.start, n, w.seq_id))
    return StepBatch(
        tokens=torch.tensor(tokens, device=device),
        positions=torch.tensor(positions, device=device),
        slot_ids=torch.tensor(slots, device=device),
        num_decode=len(decode),
        decode=_group(decode, block_size, device, with_rows=False) if decode else None,
        prefill=_group(chunks, block_size, device, with_rows=True) if chunks else None,
        fresh=_group(fresh, block_size, device, with_rows=True, causal=True) if fresh else None,
        logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=device),
        sampled=sampled,
    )


def _group(items: list[tuple[list[int], int, int, int, int]], block_size: int, device: torch.device,
           with_rows: bool, causal: bool = False) -> AttentionGroup:
    """items: (blocks, first row, start, n, seq_id) per sequence, in batch row order. causal:
    chunks from position 0, which need neither blocks nor a mask."""
    tables, first_rows, start_list, lens_list, seq_ids = (list(x) for x in zip(*items))
    width = max(len(b) for b in tables)
    t = max(lens_list)
    starts = torch.tensor(start_list)  # [B]
    lens = torch.tensor(lens_list)  # [B]
    rows = outputs = dest = None
    if with_rows:
        first = torch.tensor(first_rows)
        # padded queries read the sequence's last real row (any valid row would do)
        rows = (first[:, None] + torch.minimum(torch.arange(t)[None], lens[:, None] - 1)).flatten()
        outputs = torch.cat([torch.arange(n) + k * t for k, n in enumerate(lens_list)])
        dest = torch.cat([torch.arange(r, r + n) for r, n in zip(first_rows, lens_list)])
        rows, outputs, dest = rows.to(device), outputs.to(device), dest.to(device)
    if causal:
        return AttentionGroup(len(items), t, width, None, None, rows, outputs, dest, tuple(seq_ids),
                              tuple(start_list), tables)
    blocks = torch.tensor([b + [0] * (width - len(b)) for b in tables])  # [B, width]
    # query q of a sequence sits at position start + q; padded queries repeat the last real
    # one, so every mask row sees at least one key (an all -inf row would give NaN)
    q_pos = starts[:, None] + torch.minimum(torch.arange(t)[None], lens[:, None] - 1)  # [B, T]
    keys = torch.arange(width * block_size)
    visible = keys[None, None, :] <= q_pos[:, :, None]  # [B, T, S]: causal, offset by the cached prefix
    mask = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))[:, None]  # [B, 1, T, S]
    return AttentionGroup(len(items), t, width, blocks.flatten().to(device), mask.to(device), rows, outputs,
                          dest, tuple(seq_ids), tuple(start_list), tables)
