"""Shared fixtures: the real embedded Valkey store and the tiny models, once per session; one torch
thread per module; transformers as the correctness oracle (`hf_reference`, `greedy_reference`)."""

from __future__ import annotations

import asyncio
import gc
import io
import os
import selectors
import sys
import threading
import traceback
import warnings
from pathlib import Path

import pytest
import torch

from services.common.store import EmbeddedStore
from services.engine.model_config import ModelConfig
from services.engine.tiny import create_tiny_model


@pytest.fixture(scope="session")
def store_url():
    """REDIS_URL when given, else an embedded Valkey server for the whole session."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    store = EmbeddedStore()
    yield store.start()
    store.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_moe_model(tmp_path_factory) -> Path:
    from services.engine.tiny_moe import create_tiny_moe_model

    return create_tiny_moe_model(tmp_path_factory.mktemp("models") / "tiny-moe")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one intra-op thread is as fast, and immune to a busy CPU's spin-waits.

    A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hf_reference(model_dir):
    """The transformers model of a model directory, in float32, ready for inference."""
    from transformers import AutoModelForCausalLM  # slow import: only the tests that compare pay it

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def greedy_reference(model_dir, prompts: list[str], max_tokens: list[int], ignore_eos: bool = False) -> list[list[int]]:
    """transformers' greedy tokens for each prompt (tokenized with its bos), up to max_tokens each.

    The end-of-sequence token ends a completion (and is part of it) unless ignore_eos, as the
    engine does for requests with and without `ignore_eos`.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = hf_reference(model_dir)
    eos = set(ModelConfig.from_dir(model_dir).eos_token_ids)  # config and generation config, as the engine reads them
    out = []
    with torch.no_grad():
        for prompt, n in zip(prompts, max_tokens):
            step = model(torch.tensor([tok.encode(prompt)]), use_cache=True)
            tokens: list[int] = []
            for _ in range(n):
                tokens.append(int(step.logits[0, -1].argmax()))
                if len(tokens) == n or (tokens[-1] in eos and not ignore_eos):
                    break
                step = model(torch.tensor([tokens[-1:]]), past_key_values=step.past_key_values, use_cache=True)
            out.append(tokens)
    return out


def _await_chain(coro, depth: int = 12) -> list[str]:
    """Where a coroutine waits: each frame down its chain of awaits (cr_await / ag_await /
    gi_yieldfrom), as file:line in function. Task.print_stack cannot walk some of these (it
    failed on coroutines with no current line), so this one names what it cannot read."""
    lines = []
    while coro is not None and depth > 0:
        depth -= 1
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            lines.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        else:
            lines.append(repr(coro)[:200])
        coro = (getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
                or getattr(coro, "gi_yieldfrom", None))
    return lines


def _unregistered_readers_text() -> str:
    """Socket transports that should be reading but are missing from their event loop's selector:
    their peer's bytes are never read. (A garbage-collected client closing late did that once: see
    tests/test_clients_are_closed.py.)"""
    from asyncio.selector_events import _SelectorSocketTransport

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transports = [o for o in gc.get_objects() if isinstance(o, _SelectorSocketTransport)]
    lost = []
    for t in transports:
        if t.is_closing() or not t.is_reading() or t._loop.is_closed():
            continue
        key = t._loop._selector.get_map().get(t._sock_fd)
        if key is None or not (key.events & selectors.EVENT_READ):
            lost.append(f"  fd {t._sock_fd} {t.get_extra_info('sockname')} <- {t.get_extra_info('peername')}: "
                        f"protocol {type(t._protocol).__name__}")
    head = f"{len(lost)} socket transports reading but not in their loop's selector"
    return "\n".join([head, *lost])


def _pending_tasks_text() -> str:
    """Every unfinished asyncio task's stack, and every thread's: pytest shows neither, and a
    hung test is almost always a coroutine (or a model thread) waiting on something."""
    with warnings.catch_warnings():  # isinstance() on some torch module proxies warns
        warnings.simplefilter("ignore")
        tasks = [o for o in gc.get_objects() if isinstance(o, asyncio.Task) and not o.done()]
    out = io.StringIO()
    print(f"{len(tasks)} pending asyncio tasks", file=out)
    for task in tasks:
        print(f"- {task!r}", file=out)
        for line in _await_chain(task.get_coro()):
            print(f"    {line}", file=out)
    print(_unregistered_readers_text(), file=out)
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        if ident != threading.get_ident():
            print(f"--- thread {names.get(ident, ident)}", file=out)
            out.write("".join(traceback.format_stack(frame, limit=8)))
    return out.getvalue()


def _dump_pending_tasks(name: str) -> None:
    print(f"\n=== {name}: near the timeout ===\n{_pending_tasks_text()}", file=sys.stderr)


TIMEOUT_ERRORS = ("TimeoutError", "APITimeoutError", "ReadTimeout", "DEADLINE_EXCEEDED", "not met in time")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that failed by waiting too long (a client timeout, not pytest-timeout) leaves its
    module's stack running until teardown: show where that stack's requests are stuck."""
    outcome = yield
    report = outcome.get_result()
    if call.when == "call" and report.failed and call.excinfo is not None:
        text = f"{call.excinfo.typename}: {str(call.excinfo.value)[:300]}"
        if any(marker in text for marker in TIMEOUT_ERRORS):
            report.sections.append(("pending tasks and threads at the failure", _pending_tasks_text()))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Shortly before pytest-timeout fires (its limit covers setup, call and teardown together),
    dump the pending asyncio tasks: a stack that will not stop hangs in a fixture's teardown."""
    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else float(item.config.getini("timeout") or 0)
    timer = None
    if limit > 20:
        timer = threading.Timer(limit - 10, _dump_pending_tasks, args=(item.nodeid,))
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
