"""Experts servers for tests: real gRPC servers on 127.0.0.1:0 registered in the embedded Valkey."""

from __future__ import annotations

import uuid

import pytest

from services.experts.config import ExpertsConfig
from services.experts.server import ExpertsWorker


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread(one_torch_thread):
    """Every experts test module runs torch on one thread (the fixture of tests/conftest.py)."""
    yield


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def experts_config(store_url: str, prefix: str, model_dir, group: str, num_groups: int, **extra) -> ExpertsConfig:
    return ExpertsConfig(model_dir=str(model_dir), store_url=store_url, store_prefix=prefix, expert_group=group,
                         num_groups=num_groups, report_interval_s=0.2, heartbeat_ttl_s=1.0, **extra)


async def start_experts(store_url: str, prefix: str, model_dir, groups: list[str], num_groups: int, **extra):
    servers = []
    for group in groups:
        server = ExpertsWorker(experts_config(store_url, prefix, model_dir, group, num_groups, **extra))
        await server.start()
        servers.append(server)
    return servers
