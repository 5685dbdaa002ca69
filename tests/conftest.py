"""Shared fixtures: the real embedded Valkey store and the tiny models, once per session; one torch
thread per module; transformers as the correctness oracle (`hf_reference`, `greedy_reference`)."""

from __future__ import annotations

import asyncio
import gc
import io
import os
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


def _pending_tasks_text() -> str:
    """Every unfinished asyncio task's stack, and every thread's: pytest shows neither, and a
    hung test is almost always a coroutine (or a model thread) waiting on something."""
    with warnings.catch_warnings():  # isinstance() on some torch module proxies warns
        warnings.simplefilter("ignore")
        tasks = [o for o in gc.get_objects() if isinstance(o, asyncio.Task) and not o.done()]
    out = io.StringIO()
    print(f"{len(tasks)} pending asyncio tasks", file=out)
    for task in tasks:
        try:
            task.print_stack(limit=8, file=out)
        except Exception as exc:  # a task finishing under our feet: skip it
            print(f"  ({exc!r})", file=out)
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
