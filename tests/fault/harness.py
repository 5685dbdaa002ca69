"""What the fault tests share: `elastune up` as a subprocess, its children by role, a store that can be
killed and restarted on the same port, and streams that count every token they receive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai

from services.common.store import EmbeddedStore
from services.launcher import free_port

MAX_TOKENS = 64


def children(pid: int, role: str) -> list[int]:
    """Live processes started by `pid` as `services.cli serve <role>`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and f"serve {role}" in cmd:
            found.append(int(stat.parent.name))
    return sorted(found)


def health(base: str) -> dict[str, int]:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as resp:
            return json.loads(resp.read())["workers"]
    except urllib.error.HTTPError as err:
        return json.loads(err.read())["workers"]
    except OSError:
        return {}


def wait_for(condition, timeout_s: float, what: str, every_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(every_s)


class RestartableStore:
    """An embedded Valkey server on a fixed port; `kill()` SIGKILLs the server process itself (no clean
    shutdown, every connection cut), `restart()` starts an empty one on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self._store: EmbeddedStore | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._store = EmbeddedStore(self.port)
        self._store.start()

    def kill(self) -> None:
        os.kill(self._store.pid, 9)
        os.waitpid(self._store.pid, 0)

    def restart(self) -> None:
        deadline = time.monotonic() + 10
        while True:  # the old listener may take a moment to leave the port
            try:
                self.start()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self._store is not None:
            self._store.stop()


@dataclass
class Up:
    proc: subprocess.Popen
    base: str
    log: Path

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def start_up(log_dir: Path, args: list[str], env: dict[str, str], ready_timeout_s: float = 150) -> Up:
    """`elastune up ARGS` in its own process; returns once it prints its banner."""
    port = free_port()
    log = log_dir / "up.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--port", str(port), *args],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
    )
    up = Up(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + ready_timeout_s
    while "OpenAI API" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"elastune up did not become ready:\n{up.tail()}")
        time.sleep(0.3)
    return up


def stop_up(up: Up) -> None:
    if up.proc.poll() is None:
        up.proc.send_signal(2)
        try:
            up.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            up.proc.kill()
            up.proc.wait()


def client(base: str, timeout_s: float = 90) -> openai.OpenAI:
    # No client retries: a request the stack failed must show up as a failure here.
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=timeout_s)


def prompt(i: int, words: int = 1) -> str:
    return f"fault {i} " + "tolerant serving " * words


def stream_tokens(c: openai.OpenAI, text: str, max_tokens: int = MAX_TOKENS) -> list[int]:
    """Greedy tokens of one streamed completion, exactly as they arrived (duplicates stay visible)."""
    tokens: list[int] = []
    finish = None
    for chunk in c.completions.create(
        model="tiny", prompt=text, max_tokens=max_tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ):
        tokens.extend(chunk.choices[0].model_extra["token_ids"])
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "length", f"stream ended with finish_reason={finish!r} after {len(tokens)} tokens"
    return tokens


class Prober:
    """Short requests, one after another, for as long as a fault lasts: every one must succeed."""

    def __init__(self, base: str):
        self.client = client(base, timeout_s=60)
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                out = self.client.completions.create(model="tiny", prompt=f"probe {i}", max_tokens=4, temperature=0)
                assert out.usage.completion_tokens >= 1
                self.done += 1
            except (openai.APIError, AssertionError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.05)

    def __enter__(self) -> "Prober":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=70)
