"""OpenAI response bodies and stream chunks for the gateway's HTTP API (pure)."""

from __future__ import annotations

from .openai_protocol import KIND_CHAT, CompletionCall

# finish_reason is passed through as given: the decode worker only ends sequences with
# "stop" or "length"; a client that goes away gets no finish at all.


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    call: CompletionCall,
    request_id: str,
    created: int,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict:
    """A non-streaming /v1/completions response."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": call.model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
        "usage": _usage(prompt_tokens, completion_tokens),
    }


def chat_response(
    call: CompletionCall,
    request_id: str,
    created: int,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict:
    """A non-streaming /v1/chat/completions response."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": call.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": _usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(
    call: CompletionCall, request_id: str, created: int, text_delta: str, finish_reason: str | None
) -> dict:
    """One streamed /v1/completions event."""
    chunk = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": call.model,
        "choices": [{"index": 0, "text": text_delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if call.include_usage:
        chunk["usage"] = None
    return chunk


def chat_chunk(
    call: CompletionCall,
    request_id: str,
    created: int,
    text_delta: str,
    finish_reason: str | None,
    first: bool,
) -> dict:
    """One streamed /v1/chat/completions event; the first one carries the assistant role."""
    delta: dict = {}
    if first:
        delta = {"role": "assistant", "content": text_delta}
    elif text_delta:
        delta = {"content": text_delta}
    chunk = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": call.model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if call.include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(call: CompletionCall, request_id: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last streamed event when stream_options.include_usage is set: no choices, only usage."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if call.kind == KIND_CHAT else "text_completion",
        "created": created,
        "model": call.model,
        "choices": [],
        "usage": _usage(prompt_tokens, completion_tokens),
    }


def models_response(model_name: str, created: int) -> dict:
    """The /v1/models list with the one served model."""
    return {
        "object": "list",
        "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "elastune"}],
    }
