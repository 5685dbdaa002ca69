"""Tests for services.gateway.openai_protocol."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from services.common.types import SamplingParams
from services.gateway.openai_protocol import (
    ApiError,
    CompletionCall,
    Limits,
    parse_chat,
    parse_completion,
    resolve_max_tokens,
)
from services.gateway.openai_responses import (
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    models_response,
    usage_chunk,
)

LIMITS = Limits(model_name="tiny-model", max_model_len=256, max_tokens_limit=128, default_max_tokens=16,
                max_stop_strings=4)
MESSAGES = [{"role": "user", "content": "hi"}]


def completion(**fields) -> dict:
    return {"model": "tiny-model", "prompt": "Hello", **fields}


def chat(**fields) -> dict:
    return {"model": "tiny-model", "messages": MESSAGES, **fields}


def error_of(parse, body, limits=LIMITS) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body, limits)
    return info.value


def assert_well_formed(error: ApiError) -> None:
    body = error.body()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str) and body["error"]["type"]
    assert body["error"]["param"] is None or isinstance(body["error"]["param"], str)
    assert body["error"]["code"] is None or isinstance(body["error"]["code"], str)
    assert 400 <= error.status <= 599
    json.dumps(body)


# ------------------------------------------------------------ ApiError


def test_api_error_body_and_default_types():
    error = ApiError(400, "bad", param="max_tokens")
    assert error.body() == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "max_tokens", "code": None}
    }
    assert str(error) == "bad"
    assert ApiError(404, "x").type == "not_found_error"
    assert ApiError(429, "x", retry_after_s=1.5).type == "rate_limit_error"
    assert ApiError(429, "x", retry_after_s=1.5).retry_after_s == 1.5
    assert ApiError(503, "x").type == "service_unavailable"
    assert ApiError(418, "x").type == "api_error"
    assert ApiError(503, "x", type="overloaded", code="busy").body()["error"]["code"] == "busy"


def test_limits_validation():
    with pytest.raises(ValueError):
        Limits(model_name="m", max_model_len=0)


# ------------------------------------------------------------ valid requests


def test_completion_defaults():
    call = parse_completion(completion(), LIMITS)
    assert call == CompletionCall(
        kind="completion",
        model="tiny-model",
        prompt="Hello",
        prompt_token_ids=None,
        messages=None,
        max_tokens=None,
        stream=False,
        include_usage=False,
        stop=(),
        sampling=SamplingParams(max_tokens=0, temperature=1.0, top_p=1.0, top_k=0, seed=None),
        user=None,
    )
    assert call.echo is False


def test_completion_all_fields():
    call = parse_completion(
        completion(
            max_tokens=20, temperature=0, top_p=0.5, top_k=40, seed=7, stop=["\n", "END"], n=1, stream=True,
            stream_options={"include_usage": True}, presence_penalty=0, frequency_penalty=0.0, user="u1",
            ignore_eos=True, stop_token_ids=[3, 4], echo=False, logprobs=None, best_of=1, suffix=None,
            some_future_field={"x": 1},
        ),
        LIMITS,
    )
    assert call.max_tokens == 20
    assert call.sampling == SamplingParams(
        max_tokens=20, temperature=0.0, top_p=0.5, top_k=40, seed=7, stop_token_ids=(3, 4), ignore_eos=True
    )
    assert call.sampling.greedy
    assert call.stop == ("\n", "END")
    assert call.stream and call.include_usage
    assert call.user == "u1"


def test_null_means_absent():
    body = completion(max_tokens=None, temperature=None, top_p=None, top_k=None, seed=None, stop=None, n=None,
                      stream=None, stream_options=None, user=None, ignore_eos=None, stop_token_ids=None)
    assert parse_completion(body, LIMITS) == parse_completion(completion(), LIMITS)


@pytest.mark.parametrize(
    ("prompt", "text", "ids"),
    [
        ("Hi", "Hi", None),
        (["Hi"], "Hi", None),
        ([1, 2, 3], None, (1, 2, 3)),
        ([[5, 0]], None, (5, 0)),
        ([0], None, (0,)),
    ],
)
def test_completion_prompt_forms(prompt, text, ids):
    call = parse_completion(completion(prompt=prompt), LIMITS)
    assert call.prompt == text
    assert call.prompt_token_ids == ids


def test_chat_messages_parsed():
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "system", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
        {"role": "assistant", "content": "ok"},
    ]
    call = parse_chat(chat(messages=messages), LIMITS)
    assert call.kind == "chat"
    assert call.prompt is None and call.prompt_token_ids is None
    assert call.messages == (
        {"role": "system", "content": "be brief"},
        {"role": "system", "content": ""},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "ok"},
    )


def test_max_completion_tokens_wins():
    call = parse_chat(chat(max_tokens=10, max_completion_tokens=20), LIMITS)
    assert call.max_tokens == 20 and call.sampling.max_tokens == 20
    assert call.max_tokens_param == "max_completion_tokens"
    assert parse_chat(chat(max_tokens=10), LIMITS).max_tokens == 10
    assert parse_chat(chat(max_tokens=10, max_completion_tokens=None), LIMITS).max_tokens == 10


def test_top_k_minus_one_means_off():
    assert parse_completion(completion(top_k=-1), LIMITS).sampling.top_k == 0


@pytest.mark.parametrize(
    ("seed", "expected"),
    [(0, 0), (5, 5), (-1, 2**63 - 1), (-(2**63), 0), (2**63 - 1, 2**63 - 1), (-2, 2**63 - 2)],
)
def test_seed_masked_to_63_bits(seed, expected):
    assert parse_completion(completion(seed=seed), LIMITS).sampling.seed == expected


def test_stop_single_string_and_limits_boundaries():
    assert parse_completion(completion(stop="x"), LIMITS).stop == ("x",)
    assert parse_completion(completion(stop=[]), LIMITS).stop == ()
    assert parse_completion(completion(stop=["a", "b", "c", "d"]), LIMITS).stop == ("a", "b", "c", "d")
    assert parse_completion(completion(max_tokens=1, temperature=2, top_p=1), LIMITS).max_tokens == 1
    assert parse_completion(completion(max_tokens=128), LIMITS).max_tokens == 128


def test_chat_accepts_neutral_unsupported_fields():
    call = parse_chat(chat(logprobs=False, top_logprobs=0, tools=[], response_format={"type": "text"},
                           logit_bias={}, tool_choice="none"), LIMITS)
    assert call.kind == "chat"


def test_max_n_limit():
    limits = Limits(model_name="tiny-model", max_model_len=256, max_n=2)
    assert parse_completion(completion(n=2), limits).kind == "completion"


# ------------------------------------------------------------ invalid requests

COMMON_CASES = [
    # (fields, param, message fragment)
    ({"max_tokens": 0}, "max_tokens", "between 1 and 128, got 0"),
    ({"max_tokens": 129}, "max_tokens", "between 1 and 128"),
    ({"max_tokens": True}, "max_tokens", "integer"),
    ({"max_tokens": 5.0}, "max_tokens", "integer"),
    ({"max_tokens": "5"}, "max_tokens", "integer"),
    ({"temperature": -0.1}, "temperature", "between 0 and 2"),
    ({"temperature": 2.5}, "temperature", "between 0 and 2"),
    ({"temperature": "hot"}, "temperature", "number"),
    ({"temperature": True}, "temperature", "number"),
    ({"temperature": float("nan")}, "temperature", "number"),
    ({"top_p": 0}, "top_p", "greater than 0 and at most 1"),
    ({"top_p": 1.5}, "top_p", "at most 1"),
    ({"top_k": -2}, "top_k", ">= 0"),
    ({"top_k": 2.5}, "top_k", "integer"),
    ({"seed": 2**63}, "seed", "between"),
    ({"seed": -(2**63) - 1}, "seed", "between"),
    ({"seed": 1.5}, "seed", "integer"),
    ({"seed": False}, "seed", "integer"),
    ({"stop": ""}, "stop", "non-empty"),
    ({"stop": 5}, "stop", "string or a list"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": ["a", ""]}, "stop[1]", "non-empty string"),
    ({"stop": ["a", 3]}, "stop[1]", "non-empty string"),
    ({"n": 2}, "n", "only n=1"),
    ({"n": 0}, "n", "only n=1"),
    ({"n": True}, "n", "only n=1"),
    ({"stream": "yes"}, "stream", "boolean"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ({"stream": False, "stream_options": {}}, "stream_options", "only allowed when stream is true"),
    ({"stream": True, "stream_options": []}, "stream_options", "object"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage", "boolean"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"frequency_penalty": -1}, "frequency_penalty", "not supported"),
    ({"frequency_penalty": "x"}, "frequency_penalty", "number"),
    ({"logit_bias": {"1": 5}}, "logit_bias", "not supported"),
    ({"user": 5}, "user", "string"),
    ({"ignore_eos": 1}, "ignore_eos", "boolean"),
    ({"stop_token_ids": 5}, "stop_token_ids", "list"),
    ({"stop_token_ids": [1, -1]}, "stop_token_ids[1]", "non-negative"),
    ({"stop_token_ids": [True]}, "stop_token_ids[0]", "non-negative"),
]


@pytest.mark.parametrize(("fields", "param", "fragment"), COMMON_CASES)
@pytest.mark.parametrize("endpoint", ["completion", "chat"])
def test_invalid_common_fields(endpoint, fields, param, fragment):
    parse, make = (parse_completion, completion) if endpoint == "completion" else (parse_chat, chat)
    error = error_of(parse, make(**fields))
    assert error.status == 400
    assert error.type == "invalid_request_error"
    assert error.param == param
    assert fragment in error.message
    assert_well_formed(error)


@pytest.mark.parametrize("parse", [parse_completion, parse_chat])
@pytest.mark.parametrize("body", [None, [], "text", 3, True])
def test_body_must_be_object(parse, body):
    error = error_of(parse, body)
    assert error.status == 400 and error.param is None
    assert "JSON object" in error.message


@pytest.mark.parametrize("parse,make", [(parse_completion, completion), (parse_chat, chat)])
def test_model_required_and_known(parse, make):
    body = make()
    del body["model"]
    error = error_of(parse, body)
    assert (error.status, error.param) == (400, "model")
    assert "required" in error.message

    error = error_of(parse, make(model=3))
    assert (error.status, error.param) == (400, "model")

    error = error_of(parse, make(model="gpt-4"))
    assert (error.status, error.param, error.type) == (400, "model", "invalid_request_error")
    assert "gpt-4" in error.message and "tiny-model" in error.message
    assert error.code == "model_not_found"
    assert_well_formed(error)


COMPLETION_CASES = [
    ({"prompt": None}, "prompt", "required"),
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": []}, "prompt", "empty list"),
    ({"prompt": 5}, "prompt", "string or a list of token ids"),
    ({"prompt": [1, -2]}, "prompt[1]", "non-negative"),
    ({"prompt": [1, "a"]}, "prompt[1]", "token id"),
    ({"prompt": [1, True]}, "prompt[1]", "token id"),
    ({"prompt": [1.0]}, "prompt[0]", "string or a non-empty list of token ids"),
    ({"prompt": [""]}, "prompt[0]", "must not be empty"),
    ({"prompt": [[]]}, "prompt[0]", "non-empty list of token ids"),
    ({"prompt": [[1, -1]]}, "prompt[0][1]", "non-negative"),
    ({"prompt": ["a", "b"]}, "prompt", "batched prompts are not supported"),
    ({"prompt": [[1], [2]]}, "prompt", "batched prompts are not supported"),
    ({"prompt": ["a", 1]}, "prompt", "exactly one string"),
    ({"echo": True}, "echo", "not supported"),
    ({"echo": "no"}, "echo", "boolean"),
    ({"logprobs": 1}, "logprobs", "not supported"),
    ({"logprobs": 0}, "logprobs", "not supported"),
    ({"best_of": 2}, "best_of", "not supported"),
    ({"suffix": "tail"}, "suffix", "not supported"),
]


@pytest.mark.parametrize(("fields", "param", "fragment"), COMPLETION_CASES)
def test_invalid_completion_fields(fields, param, fragment):
    body = completion(**fields)
    if fields.get("prompt", "") is None:
        del body["prompt"]
    error = error_of(parse_completion, body)
    assert (error.status, error.param) == (400, param)
    assert fragment in error.message
    assert_well_formed(error)


CHAT_CASES = [
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": "hi"}, "messages", "non-empty list"),
    ({"messages": ["hi"]}, "messages[0]", "object"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role", "system, developer, user, assistant"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role", "one of"),
    ({"messages": [{"role": 1, "content": "hi"}]}, "messages[0].role", "one of"),
    ({"messages": [MESSAGES[0], {"role": "user"}]}, "messages[1].content", "required"),
    ({"messages": [MESSAGES[0], {"role": "assistant", "content": None}]}, "messages[1].content", "required"),
    ({"messages": [MESSAGES[0], {"role": "user", "content": 5}]}, "messages[1].content", "string or a list"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content", "empty list"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content[0]", "object"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0].type",
        "only text",
    ),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text", "string"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "between 1 and 128"),
    ({"max_completion_tokens": 200, "max_tokens": 5}, "max_completion_tokens", "between 1 and 128"),
    ({"logprobs": True}, "logprobs", "not supported"),
    ({"logprobs": 1}, "logprobs", "boolean"),
    ({"top_logprobs": 3}, "top_logprobs", "not supported"),
    ({"tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
]


@pytest.mark.parametrize(("fields", "param", "fragment"), CHAT_CASES)
def test_invalid_chat_fields(fields, param, fragment):
    error = error_of(parse_chat, chat(**fields))
    assert (error.status, error.param) == (400, param)
    assert fragment in error.message
    assert_well_formed(error)


def test_chat_messages_missing():
    error = error_of(parse_chat, {"model": "tiny-model"})
    assert (error.status, error.param) == (400, "messages")


# ------------------------------------------------------------ resolve_max_tokens


def test_resolve_defaults():
    comp = parse_completion(completion(), LIMITS)
    assert resolve_max_tokens(comp, 10, LIMITS) == 16
    assert resolve_max_tokens(comp, 250, LIMITS) == 6  # clamped to the room left
    conv = parse_chat(chat(), LIMITS)
    assert resolve_max_tokens(conv, 10, LIMITS) == 128
    assert resolve_max_tokens(conv, 200, LIMITS) == 56
    assert resolve_max_tokens(conv, 255, LIMITS) == 1


def test_resolve_explicit():
    call = parse_completion(completion(max_tokens=100), LIMITS)
    assert resolve_max_tokens(call, 156, LIMITS) == 100
    error = pytest.raises(ApiError, resolve_max_tokens, call, 157, LIMITS).value
    assert (error.status, error.param) == (400, "max_tokens")
    assert "157" in error.message and "100" in error.message and "256" in error.message
    assert "at most 99" in error.message


def test_resolve_names_max_completion_tokens():
    call = parse_chat(chat(max_completion_tokens=100), LIMITS)
    error = pytest.raises(ApiError, resolve_max_tokens, call, 200, LIMITS).value
    assert error.param == "max_completion_tokens"


@pytest.mark.parametrize(("make", "parse", "param"), [(completion, parse_completion, "prompt"),
                                                      (chat, parse_chat, "messages")])
@pytest.mark.parametrize("prompt_len", [256, 300])
def test_resolve_prompt_too_long(make, parse, param, prompt_len):
    call = parse(make(max_tokens=1), LIMITS)
    error = pytest.raises(ApiError, resolve_max_tokens, call, prompt_len, LIMITS).value
    assert (error.status, error.param) == (400, param)
    assert f"prompt is {prompt_len} tokens" in error.message
    assert "context window is 256 tokens" in error.message


# ------------------------------------------------------------ responses


def test_completion_response_shape():
    call = parse_completion(completion(), LIMITS)
    body = completion_response(call, "cmpl-1", 1700000000, "hello", "length", 3, 5)
    parsed = Completion.model_validate(body)
    assert parsed.object == "text_completion"
    assert parsed.model == "tiny-model"
    assert parsed.choices[0].text == "hello"
    assert parsed.choices[0].finish_reason == "length"
    assert parsed.choices[0].index == 0
    assert parsed.usage.total_tokens == 8
    json.dumps(body)


def test_chat_response_shape():
    call = parse_chat(chat(), LIMITS)
    body = chat_response(call, "chatcmpl-1", 1700000000, "hi there", "stop", 7, 2)
    parsed = ChatCompletion.model_validate(body)
    assert parsed.object == "chat.completion"
    assert parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].message.content == "hi there"
    assert parsed.choices[0].finish_reason == "stop"
    assert parsed.usage.prompt_tokens == 7 and parsed.usage.completion_tokens == 2


def test_completion_chunk_shapes():
    call = parse_completion(completion(stream=True, stream_options={"include_usage": True}), LIMITS)
    body = completion_chunk(call, "cmpl-1", 1, "he", None)
    # OpenAI streams finish_reason null until the last chunk, but the SDK's Completion
    # type (which the SDK fills without validation when streaming) declares it non-null.
    assert body["choices"][0]["finish_reason"] is None
    body["choices"][0]["finish_reason"] = "stop"
    middle = Completion.model_validate(body)
    assert middle.choices[0].text == "he"
    last = Completion.model_validate(completion_chunk(call, "cmpl-1", 1, "", "stop"))
    assert last.choices[0].finish_reason == "stop"
    usage = Completion.model_validate(usage_chunk(call, "cmpl-1", 1, 4, 6))
    assert usage.choices == [] and usage.usage.total_tokens == 10
    assert usage_chunk(call, "cmpl-1", 1, 4, 6)["object"] == "text_completion"


def test_chat_chunk_shapes():
    call = parse_chat(chat(stream=True), LIMITS)
    first = ChatCompletionChunk.model_validate(chat_chunk(call, "c-1", 1, "", None, first=True))
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant"
    middle = ChatCompletionChunk.model_validate(chat_chunk(call, "c-1", 1, "abc", None, first=False))
    assert middle.choices[0].delta.content == "abc" and middle.choices[0].delta.role is None
    last_body = chat_chunk(call, "c-1", 1, "", "length", first=False)
    assert last_body["choices"][0]["delta"] == {}
    last = ChatCompletionChunk.model_validate(last_body)
    assert last.choices[0].finish_reason == "length"
    assert "usage" not in last_body
    usage = ChatCompletionChunk.model_validate(usage_chunk(call, "c-1", 1, 3, 4))
    assert usage.choices == [] and usage.usage.total_tokens == 7


def test_chunks_carry_null_usage_when_requested():
    call = parse_chat(chat(stream=True, stream_options={"include_usage": True}), LIMITS)
    body = chat_chunk(call, "c-1", 1, "x", None, first=True)
    assert body["usage"] is None
    assert ChatCompletionChunk.model_validate(body).choices[0].delta.content == "x"


def test_models_response_shape():
    body = models_response("tiny-model", 1700000000)
    assert body["object"] == "list"
    models = [Model.model_validate(m) for m in body["data"]]
    assert [m.id for m in models] == ["tiny-model"]
    assert models[0].object == "model" and models[0].created == 1700000000


# ------------------------------------------------------------ properties

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=12,
)
messages_values = st.lists(
    st.fixed_dictionaries(
        {"role": st.one_of(st.sampled_from(["user", "system", "developer", "assistant", "tool"]), json_values)},
        optional={"content": st.one_of(
            st.text(max_size=5),
            st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": json_values}),
                     max_size=2),
            json_values,
        )},
    ),
    max_size=3,
)
# For each field, values near what a client would send, mixed with arbitrary JSON.
FIELD_VALUES = {
    "model": st.sampled_from(["tiny-model", "gpt-4"]),
    "prompt": st.one_of(st.text(max_size=5), st.lists(st.integers(-1, 10), max_size=3),
                        st.lists(st.text(max_size=3), max_size=2)),
    "messages": messages_values,
    "max_tokens": st.integers(-1, 300),
    "max_completion_tokens": st.integers(-1, 300),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-3, 50),
    "seed": st.integers(-(2**64), 2**64),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=6)),
    "n": st.integers(-1, 3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.one_of(st.booleans(), json_values)}),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.sampled_from([0, 0.0, 1]),
    "logprobs": st.sampled_from([True, False, 0, 2]),
    "top_logprobs": st.integers(0, 2),
    "echo": st.booleans(),
    "best_of": st.integers(0, 2),
    "suffix": st.sampled_from(["", "x"]),
    "user": st.text(max_size=3),
    "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(st.integers(-1, 5), max_size=3),
    "logit_bias": st.sampled_from([{}, {"1": 2}]),
    "tools": st.sampled_from([[], [{"type": "function"}]]),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
}
BASE_BODY = {"model": "tiny-model", "prompt": "Hello", "messages": MESSAGES}
request_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {}, optional={name: st.one_of(values, st.none(), json_values) for name, values in FIELD_VALUES.items()}
    ).map(lambda fields: {**BASE_BODY, **fields}),
)


@settings(max_examples=200, deadline=None)
@given(body=request_bodies, prompt_len=st.integers(0, 400))
def test_property_parse_raises_only_api_error(body, prompt_len):
    for parse in (parse_completion, parse_chat):
        try:
            call = parse(body, LIMITS)
        except ApiError as error:
            assert_well_formed(error)
            continue
        assert isinstance(call, CompletionCall)
        assert call.max_tokens is None or 1 <= call.max_tokens <= LIMITS.max_tokens_limit
        assert call.sampling.seed is None or 0 <= call.sampling.seed < 2**63
        assert 0 <= call.sampling.temperature <= 2 and 0 < call.sampling.top_p <= 1
        assert len(call.stop) <= LIMITS.max_stop_strings and all(call.stop)
        try:
            max_tokens = resolve_max_tokens(call, prompt_len, LIMITS)
        except ApiError as error:
            assert_well_formed(error)
        else:
            assert 1 <= max_tokens and prompt_len + max_tokens <= LIMITS.max_model_len
