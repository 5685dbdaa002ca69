"""Background loops stop when cancelled, even when a client turns the cancel into its own error."""

from __future__ import annotations

import asyncio

import pytest

from services.common.tasks import raise_if_cancelling, spawn, stop_task


class EatsCancel:
    """A client call that, like the store client on Python 3.11 when its own timeout fires together
    with a cancel, raises an ordinary error instead of CancelledError."""

    def __init__(self):
        self.calls = 0
        self.stop = False  # lets a test end an unguarded loop

    async def call(self) -> None:
        self.calls += 1
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise TimeoutError("read timed out") from None


async def _loop(client: EatsCancel, guarded: bool) -> None:
    while not client.stop:
        try:
            await client.call()
        except Exception as exc:  # the loop's usual "store down: retry" handler
            if guarded:
                raise_if_cancelling(exc)
        await asyncio.sleep(0.01)


async def test_a_guarded_loop_stops_on_cancel_even_when_the_client_eats_it():
    client = EatsCancel()
    task = spawn(_loop(client, guarded=True), name="guarded")
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=2)
    assert client.calls == 1


async def test_an_unguarded_loop_would_run_on():
    client = EatsCancel()
    task = spawn(_loop(client, guarded=False), name="unguarded")
    await asyncio.sleep(0.05)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.3)
    assert not done and client.calls == 2  # the cancel was lost: the loop went on to a second call
    client.stop = True
    task.cancel()  # eaten again, but now the loop ends
    await asyncio.wait_for(task, timeout=2)


def test_outside_a_cancelled_task_nothing_is_raised():
    async def main():
        raise_if_cancelling(RuntimeError("store down"))
        return True

    assert asyncio.run(main())


async def test_stop_task_ends_a_loop_whose_client_retries_through_a_cancel():
    """A client that retries on its own (the store client with retry_on_timeout) can eat a cancel
    without raising: one cancel would leave the loop running; stop_task sends it again."""
    calls = 0

    async def retrying_call() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass  # "timed out": retried, and succeeded
        await asyncio.sleep(0.05)

    async def loop() -> None:
        while True:
            await retrying_call()

    task = spawn(loop(), name="retrying")
    await asyncio.sleep(0.05)
    await asyncio.wait_for(stop_task(task, resend_s=0.1), timeout=3)
    assert task.cancelled() and calls >= 2  # the first cancel was eaten; a later one ended it
