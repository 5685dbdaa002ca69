"""Shared fixtures: the real embedded Valkey store and the tiny model, once per session."""

from __future__ import annotations

import os
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
