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


def raise_if_cancelling(exc: BaseException) -> None:
    """Call from `except Exception` in a loop that must stop when its task is cancelled.

    A cancel can come out of a client call as an ordinary error: the store client's own timeout
    firing together with our cancel gives a TimeoutError on Python 3.11, and the cancel is gone.
    A loop that logs the error and goes on would then never stop (seen as a hung shutdown), so
    while the task is being cancelled the error is turned back into the cancellation.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError() from exc


async def stop_task(task: asyncio.Task, resend_s: float = 0.5) -> None:
    """Cancel a background task and wait until it has ended, sending the cancel again every
    `resend_s`: a client that retries internally (the store client on a timeout) can swallow one
    without raising anything, and the owner's shutdown must not wait forever for it."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=resend_s)
    if not task.cancelled():
        task.exception()  # retrieved: the done-callback from spawn() has already logged it
