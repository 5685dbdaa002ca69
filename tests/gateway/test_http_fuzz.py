"""Property-based fuzzing of the HTTP API against one real running stack: whatever the body,
fields, types, headers, path or method, the gateway answers in time, never with a 5xx for
bad input, and every error is a well-formed OpenAI error object."""

from __future__ import annotations

import json

import aiohttp
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.stack import start_stack

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_TOKENS_LIMIT = 8  # keeps every accepted request short
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=20)  # a hang fails the example

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "n", "stream", "stream_options", "stop", "seed", "logprobs", "echo", "user", "timeout", "ignore_eos",
          "stop_token_ids", "presence_penalty", "logit_bias", "return_token_ids", "tools", "response_format"]
BASE = {
    "/v1/completions": {"model": "tiny", "prompt": "fuzz", "max_tokens": 3},
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "fuzz"}], "max_tokens": 3},
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def base_url(store_url, tiny_model):
    stack = await start_stack(store_url, tiny_model, gateway_overrides={"max_tokens_limit": MAX_TOKENS_LIMIT})
    yield stack.base_url
    await stack.stop()


def check_error_body(status: int, payload: object) -> None:
    assert isinstance(payload, dict) and set(payload) == {"error"}, payload
    err = payload["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)


async def call(base_url: str, method: str, path: str, data: bytes | None, headers: dict) -> tuple[int, bytes, str]:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http:
        async with http.request(method, base_url + path, data=data, headers=headers) as resp:
            return resp.status, await resp.read(), resp.headers.get("Content-Type", "")


def check_answer(status: int, raw: bytes, content_type: str) -> None:
    # 504 is right when the fuzzer asked for a timeout of microseconds; nothing else may be 5xx
    assert status < 500 or (status == 504 and b"timeout_error" in raw), (status, raw[:300])
    if status >= 400:
        check_error_body(status, json.loads(raw))
    elif content_type.startswith("text/event-stream"):
        events = [line for line in raw.split(b"\n") if line.startswith(b"data: ")]
        assert events and events[-1] == b"data: [DONE]"
        for e in events[:-1]:
            assert "error" not in json.loads(e[6:])
    else:
        body = json.loads(raw)
        assert "error" not in body


@FUZZ
@given(path=st.sampled_from(sorted(BASE)), changes=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4),
       drop=st.sets(st.sampled_from(["model", "prompt", "messages", "max_tokens"]), max_size=2))
async def test_fuzzed_fields(base_url, path, changes, drop):
    body = {k: v for k, v in {**BASE[path], **changes}.items() if k not in drop}
    status, raw, ctype = await call(base_url, "POST", path, json.dumps(body).encode(),
                                    {"Content-Type": "application/json"})
    check_answer(status, raw, ctype)
    if status == 200:
        assert not set(drop) & {"model"}  # a body without a model is never accepted


@settings(FUZZ, max_examples=30)
@given(path=st.sampled_from(sorted(BASE)), body=json_values)
async def test_fuzzed_json_documents(base_url, path, body):
    status, raw, ctype = await call(base_url, "POST", path, json.dumps(body).encode(), {})
    check_answer(status, raw, ctype)
    assert status == 400  # no random document is a valid request: "model" must be "tiny"


@settings(FUZZ, max_examples=30)
@given(path=st.sampled_from(sorted(BASE)) | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=20)
       .map(lambda p: "/" + p.lstrip("/")),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
       data=st.binary(max_size=200) | st.text(max_size=100).map(str.encode),
       headers=st.dictionaries(st.sampled_from(["Content-Type", "Authorization", "X-Request-Timeout", "Accept",
                                                "X-Request-Id"]),
                               st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40), max_size=3))
async def test_fuzzed_paths_methods_bytes_and_headers(base_url, path, method, data, headers):
    try:
        status, raw, ctype = await call(base_url, method, path, data, headers)
    except aiohttp.InvalidURL:
        return  # the client refused to send it; nothing reached the gateway
    if path in ("/health", "/metrics", "/v1/models") and method == "GET":
        assert status == 200
        return
    check_answer(status, raw, ctype)
    assert status >= 400 or (method == "POST" and path in BASE)


@settings(FUZZ, max_examples=30)
@given(timeout=st.text(max_size=12) | st.floats().map(str), path=st.sampled_from(sorted(BASE)))
async def test_fuzzed_timeout_header(base_url, timeout, path):
    try:
        status, raw, ctype = await call(base_url, "POST", path, json.dumps(BASE[path]).encode(),
                                        {"X-Request-Timeout": timeout})
    except ValueError:
        return  # a header value aiohttp will not send (newlines)
    check_answer(status, raw, ctype)
    if status == 400:
        assert json.loads(raw)["error"]["param"] == "X-Request-Timeout"
