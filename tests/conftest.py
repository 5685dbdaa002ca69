"""Shared fixtures: the real embedded Valkey store and the tiny model, once per session."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import warnings
from pathlib import Path

import pytest

from services.common.store import EmbeddedStore
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


def _dump_pending_tasks(name: str) -> None:
    """Print every unfinished asyncio task's stack: pytest-timeout shows threads, not coroutines,
    and a hung test is almost always a coroutine waiting on something."""
    with warnings.catch_warnings():  # isinstance() on some torch module proxies warns
        warnings.simplefilter("ignore")
        tasks = [o for o in gc.get_objects() if isinstance(o, asyncio.Task) and not o.done()]
    print(f"\n=== {name}: {len(tasks)} pending asyncio tasks near the timeout ===", file=sys.stderr)
    for task in tasks:
        try:
            task.print_stack(limit=8, file=sys.stderr)
        except Exception as exc:  # a task finishing under our feet: skip it
            print(f"  ({exc!r})", file=sys.stderr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
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
