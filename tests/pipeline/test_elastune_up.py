"""`elastune up` as a user runs it: separate processes, the official openai client, a killed worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from services.launcher import free_port

pytestmark = pytest.mark.slow



def children(pid: int, role: str) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and f"serve {role}" in cmd:
            found.append(int(stat.parent.name))
    return found


def health(base: str) -> dict:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as resp:
            return json.loads(resp.read())["workers"]
    except urllib.error.HTTPError as err:
        return json.loads(err.read())["workers"]


@pytest.fixture(scope="module")
def up(tmp_path_factory, tiny_model):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    log = open(tmp_path_factory.mktemp("up") / "up.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--model", str(tiny_model), "--prefill", "1", "--decode", "3",
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        log.seek(0)
        if "OpenAI API" in log.read():
            break
        assert proc.poll() is None, "elastune up exited during start-up"
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("elastune up did not become ready")
    yield proc, base
    if proc.poll() is None:
        proc.kill()


def test_openai_client_non_streaming_and_streaming(up):
    _, base = up
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
    done = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0)
    assert 1 <= done.usage.completion_tokens <= 8 and done.usage.prompt_tokens > 0
    assert done.choices[0].finish_reason in ("length", "stop")
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6)
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens > 0
    pieces, finishes = [], []
    for chunk in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finishes.append(chunk.choices[0].finish_reason)
        else:
            usage = chunk.usage
    assert finishes[-1] in ("length", "stop") and usage.completion_tokens >= 1
    again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=10,
                                           temperature=0)
    assert "".join(pieces) == again.choices[0].message.content  # streaming and not give the same text
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    assert err.value.body["param"] == "max_tokens"


def stream_tokens(client, i: int) -> list[int]:
    tokens = []
    for chunk in client.completions.create(
        model="tiny", prompt=f"stream {i} " * (i + 1), max_tokens=120, temperature=0, stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ):
        tokens.extend(chunk.choices[0].model_extra["token_ids"])
    return tokens


def test_kill_9_of_a_decode_worker_mid_stream_loses_no_token(up):
    proc, base = up
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
    with ThreadPoolExecutor(8) as pool:
        expected = list(pool.map(lambda i: stream_tokens(client, i), range(8)))
        running = [pool.submit(stream_tokens, client, i) for i in range(8)]
        time.sleep(0.6)  # every stream is under way
        os.kill(children(proc.pid, "decode")[0], signal.SIGKILL)
        got = [f.result(timeout=60) for f in running]
    assert got == expected
    assert all(len(t) == 120 for t in got)


def test_killed_decode_worker_leaves_routing(up):
    proc, base = up
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
    decodes = children(proc.pid, "decode")
    deadline = time.monotonic() + 8  # heartbeat TTL is 3 s
    while health(base)["decode"] != len(decodes):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert len(decodes) == 2
    os.kill(decodes[0], signal.SIGKILL)
    deadline = time.monotonic() + 8
    while health(base)["decode"] != 1:
        assert time.monotonic() < deadline, "the dead worker is still routed to"
        time.sleep(0.2)
    for i in range(8):
        resp = client.completions.create(model="tiny", prompt=f"still serving {i}", max_tokens=4)
        assert resp.choices[0].finish_reason in ("length", "stop")


def test_sigterm_stops_every_process(up):
    proc, base = up
    kids = [pid for role in ("gateway", "prefill", "decode") for pid in children(proc.pid, role)]
    assert kids
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=40) == 0
    for pid in kids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
