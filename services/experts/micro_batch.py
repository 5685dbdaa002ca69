"""Expert micro-batches: a Forward call's routed tokens cut into pieces of at most N, run in turn.

Why: a call holds the experts' device for its whole compute, so a prefill's call of thousands of
routed tokens makes every decode step's call behind it wait that long. Cut into micro-batches,
other callers' pieces get the device between this call's pieces (the server queues pieces, not
calls), the time the device is held per step (the experts' step latency, which the tuner trades
against throughput) is bounded by the micro-batch size, and on a GPU share the size decides
where the expert matmuls stop gaining from more of the device. The size is the worker's runtime
`max_batch_size` (Admin SetConfig), in routed tokens ((token, expert) pairs).

Cuts fall between tokens: all of a token's pairs (its top-k experts) stay in one piece, so its
weighted sum adds the same terms in the same order (ascending expert id, see mix_experts) as
without a cut; only the matmul row blocking differs (float rounding of a GEMM over fewer rows).
A piece therefore holds at least one token, even when that token's pairs exceed the limit.
Pure tensor code: no I/O, no threads.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..engine.moe_model import mix_experts
from .wire import ExpertCall

ExpertPair = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # (layer, expert) -> (gate_up, down)


@dataclass
class Piece:
    rows: slice  # the call's token rows this piece computes: out[rows] = compute(piece.call)
    call: ExpertCall  # x = the call's x[rows]; token_index rebased to rows.start


def split(call: ExpertCall, max_routed: int) -> list[Piece]:
    """The call's pairs cut into pieces of <= max_routed pairs at token boundaries, in token order.
    A call within the limit is one piece (the call itself)."""
    if max_routed < 1:
        raise ValueError(f"max_routed must be >= 1, got {max_routed}")
    n_pairs = int(call.expert_ids.numel())
    if n_pairs <= max_routed:
        return [Piece(slice(0, call.x.shape[0]), call)]
    order = torch.argsort(call.token_index, stable=True)  # [P] pairs grouped by token
    tokens = call.token_index[order].tolist()
    pieces = []
    start = 0
    while start < n_pairs:
        end = min(start + max_routed, n_pairs)
        if end < n_pairs and tokens[end] == tokens[end - 1]:  # the cut would split a token's pairs
            back = bisect_left(tokens, tokens[end], start, end)
            end = back if back > start else bisect_right(tokens, tokens[end], end, n_pairs)
        first, last = tokens[start], tokens[end - 1]
        pick = order[start:end]
        piece = ExpertCall(call.layer, call.x[first : last + 1], call.token_index[pick] - first,
                           call.expert_ids[pick], call.weights[pick])
        pieces.append(Piece(slice(first, last + 1), piece))
        start = end
    return pieces


def compute(call: ExpertCall, expert: ExpertPair, dtype: torch.dtype,
            device: torch.device | None = None) -> torch.Tensor:
    """The weighted expert outputs of one call or piece, [N, H] in the call's dtype and on its
    device; computed in `dtype` on `device` (the experts' own; default: the call's)."""
    on = device or call.x.device
    out = mix_experts(call.x.to(on, dtype), call.token_index.to(on), call.expert_ids.to(on), call.weights.to(on),
                      lambda e: expert(call.layer, e))
    return out.to(call.x.device, call.x.dtype)


def assemble(call: ExpertCall, pieces: list[Piece], outputs: list[torch.Tensor]) -> torch.Tensor:
    """The call's [N, H] output from its pieces' outputs (rows no pair routes to stay 0)."""
    if len(pieces) == 1 and pieces[0].call is call:
        return outputs[0]
    out = torch.zeros_like(call.x)
    for piece, y in zip(pieces, outputs):
        out[piece.rows] = y
    return out
