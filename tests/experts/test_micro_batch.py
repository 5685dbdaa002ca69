"""The expert micro-batch: calls cut at token boundaries, the knob set through Admin SetConfig,
outputs unchanged by the cut, hot swaps under concurrent Forward calls, and the head-of-line
wait it removes."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
import torch

from services.engine.moe_model import pairs
from services.experts import wire
from services.experts.config import ExpertsConfig
from services.experts.micro_batch import assemble, compute, split
from services.experts.server import ExpertsWorker
from services.experts.weights import CheckpointExperts
from services.proto import experts_pb2_grpc as pb_grpc
from services.proto import inference_pb2 as ipb
from services.proto import inference_pb2_grpc as ipb_grpc

HIDDEN, EXPERTS, TOP_K = 192, 8, 2  # the tiny MoE model


def routed_call(n: int, seed: int, layer: int = 1, shuffle: bool = True, skip_every: int = 0) -> wire.ExpertCall:
    """n tokens routed top-2 as a MoE block does; pairs shuffled (callers may send any order) and,
    with skip_every, some tokens routed to no expert of this group."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, HIDDEN, generator=gen)
    top = torch.rand(n, EXPERTS, generator=gen).topk(TOP_K, dim=-1)
    token_index, expert_ids, weights = pairs(top.indices, torch.softmax(top.values, dim=-1))
    keep = torch.ones_like(token_index, dtype=torch.bool)
    if skip_every:
        keep = token_index % skip_every != 0
    order = torch.randperm(int(keep.sum()), generator=gen) if shuffle else torch.arange(int(keep.sum()))
    return wire.ExpertCall(layer, x, token_index[keep][order], expert_ids[keep][order], weights[keep][order])


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 16, 39, 40, 1000])
def test_split_covers_every_pair_once_within_the_limit_and_keeps_tokens_whole(limit: int) -> None:
    call = routed_call(20, seed=limit, skip_every=7)
    pieces = split(call, limit)
    n_pairs = call.expert_ids.numel()
    if limit >= n_pairs:
        assert len(pieces) == 1 and pieces[0].call is call
    seen = []
    last_row = -1
    for piece in pieces:
        assert piece.rows.start > last_row  # pieces in token order, rows disjoint
        last_row = piece.rows.stop - 1
        tokens = (piece.call.token_index + piece.rows.start).tolist()
        assert len(tokens) <= max(limit, TOP_K)  # a token's two pairs never split, so >= one token
        assert torch.equal(piece.call.x, call.x[piece.rows])
        seen += zip(tokens, piece.call.expert_ids.tolist(), piece.call.weights.tolist())
        for t in set(tokens):  # every pair of a token it holds
            assert tokens.count(t) == int((call.token_index == t).sum())
    expected = zip(call.token_index.tolist(), call.expert_ids.tolist(), call.weights.tolist())
    assert sorted(seen) == sorted(expected)
    if limit >= TOP_K:
        assert len(pieces) >= -(-n_pairs // limit)
    with pytest.raises(ValueError, match="max_routed must be >= 1"):
        split(call, 0)


def test_split_outputs_equal_the_whole_call(tiny_moe_model) -> None:
    experts = CheckpointExperts(str(tiny_moe_model), torch.float32, torch.device("cpu"))
    call = routed_call(37, seed=3, skip_every=5)
    whole = compute(call, experts.get, torch.float32)
    assert whole.abs().max() > 0.1
    for limit in (2, 7, 64):
        pieces = split(call, limit)
        out = assemble(call, pieces, [compute(p.call, experts.get, torch.float32) for p in pieces])
        # Same terms summed in the same order per token; only GEMM row blocking differs.
        assert torch.allclose(out, whole, rtol=1e-5, atol=1e-6), (limit, (out - whole).abs().max())
        assert torch.equal(out[::5], torch.zeros_like(out[::5]))  # tokens routed elsewhere stay 0


@pytest.fixture
async def server(tiny_moe_model):
    # No store: a lone server computes whatever experts a call names (weights load on first use).
    worker = ExpertsWorker(ExpertsConfig(model_dir=str(tiny_moe_model), host="127.0.0.1", port=0))
    await worker.start()
    yield worker
    await worker.stop(0.5)


def micro_batches(worker: ExpertsWorker) -> float:
    return worker.metrics.registry.get_sample_value("elastune_experts_micro_batches_total", {"group": "g0"}) or 0.0


async def forward(stub, call: wire.ExpertCall) -> torch.Tensor:
    reply = await stub.Forward(wire.request(call.layer, call.x, call.token_index, call.expert_ids, call.weights))
    return wire.from_bytes(reply.hidden, torch.float32, call.x.shape[0], HIDDEN)


async def test_set_config_changes_the_split_and_leaves_forward_results_unchanged(server) -> None:
    call = routed_call(48, seed=11)
    reference = compute(call, server.experts.get, torch.float32)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub, admin = pb_grpc.ExpertsStub(channel), ipb_grpc.AdminStub(channel)
        assert (await admin.GetConfig(ipb.Empty())).max_batch_size == server.config.max_tokens_per_call
        before = micro_batches(server)
        whole = await forward(stub, call)
        assert micro_batches(server) - before == 1  # 96 pairs, default limit 65536: not cut

        applied = await admin.SetConfig(ipb.RuntimeConfig(max_batch_size=10))
        assert applied.max_batch_size == 10 and (await admin.GetConfig(ipb.Empty())).max_batch_size == 10
        before = micro_batches(server)
        cut = await forward(stub, call)
        assert micro_batches(server) - before == len(split(call, 10)) >= 10

        report = (await admin.GetLoad(ipb.Empty()))
        assert report.config.max_batch_size == 10 and report.step_ms_p50 > 0
    assert torch.allclose(whole, reference, rtol=1e-5, atol=1e-6)
    assert torch.allclose(cut, whole, rtol=1e-5, atol=1e-6), (cut - whole).abs().max()


async def test_hot_swaps_under_concurrent_forward_calls_fail_none_and_change_no_result(server) -> None:
    calls = [routed_call(random.Random(i).choice((1, 3, 17, 64, 150)), seed=100 + i, layer=i % 4) for i in range(60)]
    references = [compute(c, server.experts.get, torch.float32) for c in calls]
    settings = [1, 4, 33, 7, 1000, 2, 64]
    swaps = 0
    done = asyncio.Event()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub, admin = pb_grpc.ExpertsStub(channel), ipb_grpc.AdminStub(channel)

        async def swapper() -> None:
            nonlocal swaps
            while not done.is_set():
                await admin.SetConfig(ipb.RuntimeConfig(max_batch_size=settings[swaps % len(settings)]))
                swaps += 1
                await asyncio.sleep(0.002)

        async def caller(mine: list[int]) -> list[tuple[int, torch.Tensor]]:
            return [(i, await forward(stub, calls[i])) for i in mine]

        swapping = asyncio.create_task(swapper())
        results = await asyncio.gather(*(caller(list(range(k, len(calls), 6))) for k in range(6)))
        done.set()
        await swapping
    assert swaps >= 5
    assert micro_batches(server) > len(calls)  # some calls were cut
    for i, got in (r for rs in results for r in rs):
        assert torch.allclose(got, references[i], rtol=1e-5, atol=1e-6), (i, (got - references[i]).abs().max())
    assert server.in_flight_calls == 0 and server.in_flight_tokens == 0


async def test_a_small_call_passes_a_long_call_cut_into_micro_batches(tiny_moe_model) -> None:
    # Each routed token holds the model thread 1 ms (an emulated device): the long call's 800
    # pairs take 0.8 s. Uncut, a call arriving 0.15 s later waits all of that; cut into 50-pair
    # micro-batches (50 ms each), it is served between two of them and finishes first.
    worker = ExpertsWorker(ExpertsConfig(model_dir=str(tiny_moe_model), host="127.0.0.1", port=0,
                                         service_us_per_token=1000.0))
    await worker.start()
    try:
        long_call, short_call = routed_call(400, seed=1), routed_call(2, seed=2)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
            stub, admin = pb_grpc.ExpertsStub(channel), ipb_grpc.AdminStub(channel)
            await forward(stub, short_call)  # weights loaded before the race

            async def race() -> list[str]:
                order: list[str] = []

                async def run(name: str, call: wire.ExpertCall, delay: float) -> None:
                    await asyncio.sleep(delay)
                    await forward(stub, call)
                    order.append(name)

                await asyncio.gather(run("long", long_call, 0.0), run("short", short_call, 0.15))
                return order

            assert await race() == ["long", "short"]
            await admin.SetConfig(ipb.RuntimeConfig(max_batch_size=50))
            assert await race() == ["short", "long"]
    finally:
        await worker.stop(0.5)
