"""Owned background tasks: named, and their exceptions logged instead of lost."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine

import structlog

log = structlog.get_logger(__name__)


def _report(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task.failed", task=task.get_name(), error=repr(task.exception()))


def spawn(coro: Coroutine, name: str) -> asyncio.Task:
    """Start a background task; the caller keeps the handle and cancels it on shutdown."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    task.add_done_callback(_report)
    return task
