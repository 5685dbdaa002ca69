"""The experts server: Forward against the colocated experts, bad input, registration, counters."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from services.common import keys
from services.common.registry import WorkerDirectory
from services.common.store import connect
from services.engine.loader import load_model
from services.engine.moe_model import pairs
from services.experts.placement_store import read_placement
from services.experts import wire
from services.proto import experts_pb2_grpc as pb_grpc

from .conftest import start_experts


@pytest.fixture
async def server(store_url, prefix, tiny_moe_model):
    servers = await start_experts(store_url, prefix, tiny_moe_model, ["g1"], num_groups=2)
    yield servers[0]
    await servers[0].stop(0.5)


async def test_forward_equals_the_colocated_experts_and_counts_tokens(server, store_url, prefix, tiny_moe_model):
    model = load_model(tiny_moe_model, dtype="float32")
    block = model.layers[3].mlp
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ids, w = block.route(x)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply = await pb_grpc.ExpertsStub(channel).Forward(wire.request(3, x, *pairs(ids, w)))
    got = wire.from_bytes(reply.hidden, torch.float32, 5, model.config.hidden_size)
    # g1 of an even 2-group placement holds experts 4..7, but a server computes any expert sent to it
    assert (got - block.experts.forward(3, x, ids, w)).abs().max().item() < 1e-5

    store = connect(store_url)
    try:
        placement = await read_placement(store, prefix)  # the first server wrote the initial table
        assert placement.groups == {"g0": (0, 1, 2, 3), "g1": (4, 5, 6, 7)}
        [report] = await WorkerDirectory(store, prefix).workers("experts/g1")
        assert report.address.endswith(f":{server.port}")
        await server._registration.publish()
        for _ in range(30):
            counts = {int(k): int(v) for k, v in (await store.hgetall(keys.expert_tokens(prefix))).items()}
            if counts:
                break
            await asyncio.sleep(0.1)
        expected = torch.bincount(ids.reshape(-1), minlength=8).tolist()
        assert counts == {e: n for e, n in enumerate(expected) if n}
    finally:
        await store.aclose()


@pytest.mark.parametrize("change, field", [
    (dict(layer=4), "layer=4"),
    (dict(hidden_size=64), "hidden_size=64"),
    (dict(dtype="int8"), "dtype='int8'"),
    (dict(hidden=b"\0" * 12), "hidden has 12 bytes"),
    (dict(expert_ids=[8, 0]), "expert_ids must be < 8"),
    (dict(token_index=[0, 2]), "token_index must be < num_tokens=2"),
    (dict(weights=[0.5]), "one entry per pair"),
])
async def test_bad_requests_are_invalid_argument_naming_the_field(server, change, field):
    x = torch.zeros(2, 192)
    req = wire.request(0, x, torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([1.0, 1.0]))
    for name, value in change.items():
        if isinstance(value, list):
            del getattr(req, name)[:]
            getattr(req, name).extend(value)
        else:
            setattr(req, name, value)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.ExpertsStub(channel).Forward(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
