"""Fixtures the scaler tests share: a store client, a unique key prefix, a settable clock."""

from __future__ import annotations

import uuid

import pytest

from services.common.store import connect

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(store_url):
    client = connect(store_url)
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"test-scaler-{uuid.uuid4().hex}"
