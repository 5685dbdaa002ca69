"""Protobuf <-> internal dataclasses, done once at each servicer, and the checks workers share."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..proto import inference_pb2 as pb
from .types import SamplingParams


class BadRequest(ValueError):
    """Bad input: the servicer answers INVALID_ARGUMENT with this message."""


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    params = SamplingParams(
        max_tokens=msg.max_tokens,
        temperature=msg.temperature,
        top_p=msg.top_p if msg.top_p > 0 else 1.0,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
    )
    check_sampling(params)
    return params


def sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
    )
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def check_sampling(params: SamplingParams) -> None:
    if params.max_tokens < 1:
        raise BadRequest(f"sampling.max_tokens must be >= 1, got {params.max_tokens}")
    if not (0.0 <= params.temperature <= 2.0) or math.isnan(params.temperature):
        raise BadRequest(f"sampling.temperature must be in [0, 2], got {params.temperature}")
    if not (0.0 < params.top_p <= 1.0):
        raise BadRequest(f"sampling.top_p must be in (0, 1], got {params.top_p}")


def check_prompt(tokens: Sequence[int], vocab_size: int, max_len: int, max_tokens: int = 0) -> None:
    """The prompt must be non-empty, in the vocabulary, and leave room for max_tokens."""
    if not tokens:
        raise BadRequest("prompt_token_ids must not be empty")
    bad = next((t for t in tokens if t >= vocab_size), None)
    if bad is not None:
        raise BadRequest(f"prompt_token_ids holds {bad}; token ids must be < {vocab_size} (the vocabulary size)")
    if len(tokens) + max_tokens > max_len:
        raise BadRequest(
            f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the context window of {max_len} tokens"
        )
