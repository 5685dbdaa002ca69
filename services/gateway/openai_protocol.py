"""Parse and validate OpenAI request bodies, and build OpenAI-shaped responses.

Everything here is pure: no I/O, no tokenizer. The gateway parses a body with
`parse_completion` / `parse_chat`, tokenizes the prompt, then calls
`resolve_max_tokens` once the prompt length is known.

Validation follows OpenAI semantics: every problem is an `ApiError` carrying an
HTTP status, a message that says what was wrong and what is allowed, and the
offending field in `param`. A JSON `null` is treated like an absent optional
field, and fields this module does not know are ignored (SDKs send extras).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from services.common.types import SamplingParams

KIND_COMPLETION = "completion"
KIND_CHAT = "chat"

_SEED_MASK = (1 << 63) - 1
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

_DEFAULT_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error to return to the client as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str | None = None,  # noqa: A002 - the OpenAI field is called "type"
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _DEFAULT_ERROR_TYPES.get(status, "api_error")
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        """The JSON body: {"error": {"message", "type", "param", "code"}}."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.message!r}, param={self.param!r}, type={self.type!r})"


@dataclass(frozen=True)
class Limits:
    """What the served model allows."""

    model_name: str
    max_model_len: int
    max_tokens_limit: int = 4096
    default_max_tokens: int = 16
    max_stop_strings: int = 4
    max_n: int = 1

    def __post_init__(self) -> None:
        if self.max_model_len < 1 or self.max_tokens_limit < 1 or self.max_n < 1:
            raise ValueError(f"invalid limits: {self}")
        if self.default_max_tokens < 1 or self.max_stop_strings < 0:
            raise ValueError(f"invalid limits: {self}")


@dataclass(frozen=True)
class CompletionCall:
    """A validated /v1/completions or /v1/chat/completions request.

    `sampling.max_tokens` holds the requested max_tokens, or 0 as a placeholder
    when the client gave none; the real value comes from `resolve_max_tokens`
    (use `dataclasses.replace(call.sampling, max_tokens=n)`).
    """

    kind: str  # KIND_COMPLETION or KIND_CHAT
    model: str
    prompt: str | None  # completions: the text prompt; None when token ids were given
    prompt_token_ids: tuple[int, ...] | None  # completions: a prompt given as token ids
    messages: tuple[dict, ...] | None  # chat: ({"role": ..., "content": str}, ...)
    max_tokens: int | None  # None: use the default once the prompt length is known
    stream: bool
    include_usage: bool  # stream_options.include_usage
    stop: tuple[str, ...]
    sampling: SamplingParams
    user: str | None
    echo: bool = False  # always False: echo=true is rejected
    max_tokens_param: str = "max_tokens"  # the field max_tokens came from, for error messages
    return_token_ids: bool = False  # extension: choices carry the generated token ids


# ---------------------------------------------------------------- helpers


def _show(value: object) -> str:
    """A short JSON-ish rendering of a client value for error messages."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param=param)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """An int or a finite float (bool is not a number here)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_int(value)


def _opt_bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"{name} must be a boolean (true or false), got {_show(value)}")
    return value


def _opt_int_range(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or not low <= value <= high:
        raise _bad(name, f"{name} must be an integer between {low} and {high}, got {_show(value)}")
    return value


def _require_object(body: object) -> dict:
    if not isinstance(body, dict):
        raise _bad(None, f"the request body must be a JSON object, got {_show(body)}")
    return body


def _parse_model(body: dict, limits: Limits) -> str:
    model = body.get("model")
    if model is None:
        raise _bad("model", f"model is required; this server serves {_show(limits.model_name)}")
    if not isinstance(model, str):
        raise _bad("model", f"model must be a string; this server serves {_show(limits.model_name)}, got {_show(model)}")
    if model != limits.model_name:
        # 400 (not OpenAI's 404): an unknown model is a bad field of this request.
        raise ApiError(
            400,
            f"The model {_show(model)} does not exist; this server serves {_show(limits.model_name)}",
            param="model",
            code="model_not_found",
        )
    return model


def _parse_stop(body: dict, limits: Limits) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        if not value:
            raise _bad("stop", "stop must be a non-empty string or a list of non-empty strings, got \"\"")
        return (value,)
    if not isinstance(value, list):
        raise _bad("stop", f"stop must be a string or a list of strings, got {_show(value)}")
    if len(value) > limits.max_stop_strings:
        raise _bad("stop", f"stop may hold at most {limits.max_stop_strings} strings, got {len(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise _bad(f"stop[{i}]", f"stop[{i}] must be a non-empty string, got {_show(item)}")
    return tuple(value)


def _parse_stop_token_ids(body: dict) -> tuple[int, ...]:
    value = body.get("stop_token_ids")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _bad("stop_token_ids", f"stop_token_ids must be a list of non-negative integers, got {_show(value)}")
    for i, item in enumerate(value):
        if not _is_int(item) or item < 0:
            raise _bad(f"stop_token_ids[{i}]", f"stop_token_ids[{i}] must be a non-negative integer, got {_show(item)}")
    return tuple(value)


def _parse_sampling(body: dict, max_tokens: int | None) -> SamplingParams:
    temperature = body.get("temperature")
    if temperature is None:
        temperature = 1.0
    elif not _is_number(temperature) or not 0 <= temperature <= 2:
        raise _bad("temperature", f"temperature must be a number between 0 and 2, got {_show(temperature)}")

    top_p = body.get("top_p")
    if top_p is None:
        top_p = 1.0
    elif not _is_number(top_p) or not 0 < top_p <= 1:
        raise _bad("top_p", f"top_p must be a number greater than 0 and at most 1, got {_show(top_p)}")

    top_k = body.get("top_k")
    if top_k is None:
        top_k = 0
    elif not _is_int(top_k) or top_k < -1:
        raise _bad("top_k", f"top_k must be an integer >= 0 (0 or -1 turns it off), got {_show(top_k)}")

    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed) or not _INT64_MIN <= seed <= _INT64_MAX:
            raise _bad("seed", f"seed must be an integer between {_INT64_MIN} and {_INT64_MAX}, got {_show(seed)}")
        seed = seed & _SEED_MASK

    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else 0,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=max(top_k, 0),  # -1 also means "off"
        seed=seed,
        stop_token_ids=_parse_stop_token_ids(body),
        ignore_eos=_opt_bool(body, "ignore_eos"),
    )


def _reject_unsupported(body: dict, limits: Limits) -> None:
    """Fields OpenAI knows that this server accepts only at their neutral value."""
    n = body.get("n")
    if n is not None and (not _is_int(n) or not 1 <= n <= limits.max_n):
        only = "only n=1 is supported" if limits.max_n == 1 else f"n must be between 1 and {limits.max_n}"
        raise _bad("n", f"n must be an integer; {only}, got {_show(n)}")

    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value) or not -2 <= value <= 2:
            raise _bad(name, f"{name} must be a number between -2 and 2, got {_show(value)}")
        if value != 0:
            raise _bad(name, f"{name} is not supported; only 0 is accepted, got {_show(value)}")

    logit_bias = body.get("logit_bias")
    if logit_bias is not None and logit_bias != {}:
        raise _bad("logit_bias", "logit_bias is not supported; omit it or send {}")


def _parse_stream(body: dict) -> tuple[bool, bool]:
    stream = _opt_bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise _bad("stream_options", "stream_options is only allowed when stream is true")
    if not isinstance(options, dict):
        raise _bad("stream_options", f"stream_options must be an object, got {_show(options)}")
    include_usage = options.get("include_usage")
    if include_usage is None:
        return stream, False
    if not isinstance(include_usage, bool):
        raise _bad(
            "stream_options.include_usage",
            f"stream_options.include_usage must be a boolean, got {_show(include_usage)}",
        )
    return stream, include_usage


def _parse_user(body: dict) -> str | None:
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user", f"user must be a string, got {_show(user)}")
    return user


# ---------------------------------------------------------------- completions


def _parse_prompt(body: dict) -> tuple[str | None, tuple[int, ...] | None]:
    """A completions prompt: a string, a list of token ids, or a one-element list of either."""
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("prompt", "prompt is required: a string or a list of token ids")
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt", "prompt must not be empty")
        return prompt, None
    if not isinstance(prompt, list):
        raise _bad("prompt", f"prompt must be a string or a list of token ids, got {_show(prompt)}")
    if not prompt:
        raise _bad("prompt", "prompt must not be an empty list")
    if _is_int(prompt[0]):
        return None, _token_ids("prompt", prompt)
    if len(prompt) == 1:
        only = prompt[0]
        if isinstance(only, str):
            if not only:
                raise _bad("prompt[0]", "prompt[0] must not be empty")
            return only, None
        if isinstance(only, list) and only and _is_int(only[0]):
            return None, _token_ids("prompt[0]", only)
        raise _bad("prompt[0]", f"prompt[0] must be a string or a non-empty list of token ids, got {_show(only)}")
    if all(isinstance(item, (str, list)) for item in prompt):
        raise _bad("prompt", f"batched prompts are not supported: send one prompt per request, got {len(prompt)}")
    raise _bad("prompt", "prompt must be a string, a list of token ids, or a list holding exactly one string, "
                         f"got {_show(prompt)}")


def _token_ids(param: str, items: list) -> tuple[int, ...]:
    """Check a list of token ids: non-negative ints (the gateway checks the vocabulary range)."""
    for i, item in enumerate(items):
        if not _is_int(item) or item < 0:
            raise _bad(f"{param}[{i}]", f"{param}[{i}] must be a token id (a non-negative integer), got {_show(item)}")
    return tuple(items)


def parse_completion(body: object, limits: Limits) -> CompletionCall:
    """Validate a /v1/completions body."""
    body = _require_object(body)
    model = _parse_model(body, limits)
    prompt, prompt_token_ids = _parse_prompt(body)

    if _opt_bool(body, "echo"):
        raise _bad("echo", "echo is not supported; omit it or send false")
    best_of = body.get("best_of")
    if best_of is not None and not (_is_int(best_of) and best_of == 1):
        raise _bad("best_of", f"best_of is not supported; only 1 is accepted, got {_show(best_of)}")
    suffix = body.get("suffix")
    if suffix is not None and suffix != "":
        raise _bad("suffix", "suffix is not supported; omit it")
    logprobs = body.get("logprobs")
    if logprobs is not None and logprobs is not False:
        raise _bad("logprobs", "logprobs is not supported; omit it or send null")

    max_tokens = _opt_int_range(body, "max_tokens", 1, limits.max_tokens_limit)
    return _finish(body, limits, KIND_COMPLETION, model, max_tokens, "max_tokens",
                   prompt=prompt, prompt_token_ids=prompt_token_ids, messages=None)


# ---------------------------------------------------------------- chat


def _parse_content(param: str, content: object) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(param, f"{param} must be a string or a list of text parts, got {_show(content)}")
    if not content:
        raise _bad(param, f"{param} must not be an empty list")
    texts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _bad(where, f'{where} must be an object {{"type": "text", "text": ...}}, got {_show(part)}')
        if part.get("type") != "text":
            raise _bad(f"{where}.type", f'{where}.type must be "text" (only text content is supported), '
                                        f"got {_show(part.get('type'))}")
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad(f"{where}.text", f"{where}.text must be a string, got {_show(text)}")
        texts.append(text)
    return "\n".join(texts)


def _parse_messages(body: dict) -> tuple[dict, ...]:
    messages = body.get("messages")
    if messages is None:
        raise _bad("messages", "messages is required: a non-empty list of {role, content} objects")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", f"messages must be a non-empty list of {{role, content}} objects, got {_show(messages)}")
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, f"{where} must be an object with role and content, got {_show(message)}")
        role = message.get("role")
        if not isinstance(role, str) or role not in _CHAT_ROLES:
            raise _bad(f"{where}.role", f"{where}.role must be one of system, developer, user, assistant, "
                                        f"got {_show(role)}")
        if "content" not in message or message["content"] is None:
            raise _bad(f"{where}.content", f"{where}.content is required: a string or a list of text parts")
        content = _parse_content(f"{where}.content", message["content"])
        parsed.append({"role": _CHAT_ROLES[role], "content": content})
    return tuple(parsed)


def parse_chat(body: object, limits: Limits) -> CompletionCall:
    """Validate a /v1/chat/completions body."""
    body = _require_object(body)
    model = _parse_model(body, limits)
    messages = _parse_messages(body)

    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _bad("logprobs", f"logprobs must be a boolean, got {_show(logprobs)}")
    if logprobs:
        raise _bad("logprobs", "logprobs is not supported; omit it or send false")
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None and (not _is_int(top_logprobs) or top_logprobs != 0):
        raise _bad("top_logprobs", "top_logprobs is not supported; omit it or send 0")
    tools = body.get("tools")
    if tools is not None and tools != []:
        raise _bad("tools", "tools are not supported; omit them")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise _bad("response_format", 'response_format is not supported; omit it or send {"type": "text"}')

    max_tokens = _opt_int_range(body, "max_tokens", 1, limits.max_tokens_limit)
    param = "max_tokens"
    max_completion_tokens = _opt_int_range(body, "max_completion_tokens", 1, limits.max_tokens_limit)
    if max_completion_tokens is not None:
        max_tokens, param = max_completion_tokens, "max_completion_tokens"
    return _finish(body, limits, KIND_CHAT, model, max_tokens, param,
                   prompt=None, prompt_token_ids=None, messages=messages)


def _finish(
    body: dict,
    limits: Limits,
    kind: str,
    model: str,
    max_tokens: int | None,
    max_tokens_param: str,
    *,
    prompt: str | None,
    prompt_token_ids: tuple[int, ...] | None,
    messages: tuple[dict, ...] | None,
) -> CompletionCall:
    """The fields both endpoints share."""
    _reject_unsupported(body, limits)
    sampling = _parse_sampling(body, max_tokens)
    stop = _parse_stop(body, limits)
    stream, include_usage = _parse_stream(body)
    return CompletionCall(
        kind=kind,
        model=model,
        prompt=prompt,
        prompt_token_ids=prompt_token_ids,
        messages=messages,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        stop=stop,
        sampling=sampling,
        user=_parse_user(body),
        max_tokens_param=max_tokens_param,
        return_token_ids=_opt_bool(body, "return_token_ids"),
    )


# ---------------------------------------------------------------- max_tokens


def resolve_max_tokens(call: CompletionCall, prompt_len: int, limits: Limits) -> int:
    """The max_tokens to generate, given the tokenized prompt length.

    Without an explicit max_tokens: completions use `limits.default_max_tokens`,
    chat uses `limits.max_tokens_limit`; both are clamped to the room left in the
    context window.
    """
    if prompt_len < 0:
        raise ValueError(f"prompt_len must be >= 0, got {prompt_len}")
    prompt_param = "messages" if call.kind == KIND_CHAT else "prompt"
    if prompt_len >= limits.max_model_len:
        raise _bad(
            prompt_param,
            f"prompt is {prompt_len} tokens; the context window is {limits.max_model_len} tokens, "
            f"which leaves no room for output",
        )
    room = limits.max_model_len - prompt_len
    if call.max_tokens is None:
        default = limits.max_tokens_limit if call.kind == KIND_CHAT else limits.default_max_tokens
        return min(default, room)
    if call.max_tokens > room:
        name = call.max_tokens_param
        raise _bad(
            name,
            f"prompt is {prompt_len} tokens and {name} is {call.max_tokens}, which exceeds the context "
            f"window of {limits.max_model_len} tokens; {name} can be at most {room} for this prompt",
        )
    return call.max_tokens
