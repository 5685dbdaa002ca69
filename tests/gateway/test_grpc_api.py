"""gRPC Gateway.Generate: same pipeline as HTTP, errors as status codes."""

from __future__ import annotations

import grpc
import pytest

from services.proto import inference_pb2 as pb
from services.proto import inference_pb2_grpc as pb_grpc
from tests.stack import start_stack


@pytest.fixture
async def stack(store_url, tiny_model):
    s = await start_stack(store_url, tiny_model)
    yield s
    await s.stop()


async def generate(address: str, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        return [msg async for msg in pb_grpc.GatewayStub(channel).Generate(request, timeout=30)]


async def test_grpc_generate_streams_tokens_text_and_usage(stack):
    request = pb.GenerateRequest(prompt="gRPC clients stream too",
                                 sampling=pb.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    msgs = await generate(stack.grpc_address, request)
    tokens = [t for m in msgs for t in m.token_ids]
    assert len(tokens) == 12
    assert msgs[-1].finish_reason == "length"
    assert msgs[-1].usage.completion_tokens == 12 and msgs[-1].usage.prompt_tokens > 0
    assert all(m.finish_reason == "" for m in msgs[:-1])
    text = "".join(m.text for m in msgs)
    assert text == stack.gateway.tokenizer.tokenizer.decode(tokens, skip_special_tokens=True)
    by_ids = await generate(stack.grpc_address, pb.GenerateRequest(
        prompt_token_ids=stack.gateway.tokenizer.encode_text("gRPC clients stream too"),
        sampling=pb.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)))
    assert [t for m in by_ids for t in m.token_ids] == tokens


@pytest.mark.parametrize("request_kwargs,needle", [
    ({"prompt": "x", "sampling": pb.SamplingParams(max_tokens=0)}, "max_tokens"),
    ({"prompt": "x", "sampling": pb.SamplingParams(max_tokens=4, temperature=5)}, "temperature"),
    ({"sampling": pb.SamplingParams(max_tokens=4)}, "prompt"),
    ({"prompt": "x", "model": "other", "sampling": pb.SamplingParams(max_tokens=4)}, "model"),
    ({"prompt_token_ids": [10**6], "sampling": pb.SamplingParams(max_tokens=4)}, "vocabulary"),
])
async def test_grpc_bad_input_is_invalid_argument(stack, request_kwargs, needle):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(stack.grpc_address, pb.GenerateRequest(**request_kwargs))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()


async def test_stage_accounting_returns_to_zero(stack):
    pipeline = stack.gateway.pipeline
    await generate(stack.grpc_address, pb.GenerateRequest(prompt="count", sampling=pb.SamplingParams(max_tokens=3)))
    assert (pipeline.queued, pipeline.queued_tokens, pipeline.decoding) == (0, 0, 0)
    assert not pipeline.open_requests


async def test_gateway_publishes_its_load_report(stack):
    from services.common.registry import WorkerDirectory

    await generate(stack.grpc_address, pb.GenerateRequest(prompt="rate me", sampling=pb.SamplingParams(max_tokens=5)))
    directory = WorkerDirectory(stack.gateway._store, stack.gateway.config.store_prefix)
    await stack.gateway._registration.publish()
    (report,) = await directory.workers("gateway")
    assert report.worker_id == stack.gateway.gateway_id
    assert report.queue_len == 0 and report.running_seqs == 0
    assert report.prompt_tokens_per_s > 0 and report.output_tokens_per_s > 0
    assert report.ttft_ms_p95 > 0 and report.itl_ms_p95 > 0
