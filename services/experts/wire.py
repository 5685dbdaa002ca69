"""Experts.Forward messages <-> tensors, converted once at each end. Bad input -> BadCall."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..proto import experts_pb2 as pb

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NAMES = {v: k for k, v in DTYPES.items()}


class BadCall(ValueError):
    """A Forward request that cannot be served; the message names the field and the limit."""


@dataclass
class ExpertCall:
    layer: int
    x: torch.Tensor  # [N, H]
    token_index: torch.Tensor  # [P] long
    expert_ids: torch.Tensor  # [P] long
    weights: torch.Tensor  # [P] float32


def to_bytes(x: torch.Tensor) -> bytes:
    x = x.detach().contiguous().cpu()
    return x.view(torch.uint8).numpy().tobytes() if x.dtype == torch.bfloat16 else x.numpy().tobytes()


def from_bytes(data: bytes, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).view(rows, cols)


def request(layer: int, x: torch.Tensor, token_index: torch.Tensor, expert_ids: torch.Tensor,
            weights: torch.Tensor) -> pb.ForwardRequest:
    return pb.ForwardRequest(
        layer=layer, num_tokens=x.shape[0], hidden_size=x.shape[1], dtype=NAMES[x.dtype], hidden=to_bytes(x),
        token_index=token_index.tolist(), expert_ids=expert_ids.tolist(), weights=weights.float().tolist(),
    )


def parse(req: pb.ForwardRequest, num_layers: int, num_experts: int, hidden_size: int, max_tokens: int) -> ExpertCall:
    if req.layer >= num_layers:
        raise BadCall(f"layer={req.layer} is out of range: this model has {num_layers} layers")
    if req.hidden_size != hidden_size:
        raise BadCall(f"hidden_size={req.hidden_size} does not match the experts' hidden size {hidden_size}")
    if req.num_tokens > max_tokens:
        raise BadCall(f"num_tokens={req.num_tokens} exceeds the limit of {max_tokens} per call")
    dtype = DTYPES.get(req.dtype)
    if dtype is None:
        raise BadCall(f"dtype={req.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    want = req.num_tokens * req.hidden_size * dtype.itemsize
    if len(req.hidden) != want:
        raise BadCall(f"hidden has {len(req.hidden)} bytes; num_tokens x hidden_size x {dtype.itemsize} = {want}")
    n = len(req.token_index)
    if len(req.expert_ids) != n or len(req.weights) != n:
        raise BadCall(f"token_index, expert_ids and weights must have one entry per pair; got {n}, "
                      f"{len(req.expert_ids)}, {len(req.weights)}")
    token_index = torch.tensor(req.token_index, dtype=torch.long)
    expert_ids = torch.tensor(req.expert_ids, dtype=torch.long)
    if n and int(token_index.max()) >= req.num_tokens:
        raise BadCall(f"token_index must be < num_tokens={req.num_tokens}, got {int(token_index.max())}")
    if n and int(expert_ids.max()) >= num_experts:
        raise BadCall(f"expert_ids must be < {num_experts} (the expert count), got {int(expert_ids.max())}")
    x = from_bytes(req.hidden, dtype, req.num_tokens, req.hidden_size)
    return ExpertCall(req.layer, x, token_index, expert_ids, torch.tensor(req.weights, dtype=torch.float32))
