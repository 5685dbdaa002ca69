"""The tuner sidecar against real workers: hot swaps under streaming load, share changes,
online observations written back to the stored table."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

import pytest

from services.common.store import connect
from services.tuner.config import TunerConfig
from services.tuner.sidecar import TunerSidecar
from services.tuner.table import ProfilePoint, TuningTable
from tests.conftest import greedy_reference
from tests.stack import start_stack

FAST = dict(interval_s=0.1, min_dwell_s=0.0, hysteresis=0.0, explore_interval_s=0.0, settle_s=0.0,
            observe_interval_s=0.0, slo_decode_ms=1000.0, slo_prefill_ms=5000.0)


@pytest.fixture
async def stack(store_url, tiny_model):
    s = await start_stack(store_url, tiny_model)
    yield s
    await s.stop()


@pytest.fixture
async def store(store_url):
    client = connect(store_url)
    yield client
    await client.aclose()


def point(model: str, stage: str, share: float, config: dict, thr: float, p95: float = 5.0) -> ProfilePoint:
    workload = {"context_len": 64} if stage == "decode" else {"prompt_len": 32}
    return ProfilePoint(model=model, stage=stage, device="cpu", share=share, config=config,
                        throughput_tokens_per_s=thr, latency_p50_ms=p95 * 0.8, latency_p95_ms=p95, samples=5,
                        workload=workload, updated_at=time.time())


def sidecar_for(worker, store_url: str, **overrides) -> TunerSidecar:
    cfg = TunerConfig(worker=worker.address, store_url=store_url, store_prefix=worker.config.store_prefix,
                      **{**FAST, **overrides})
    return TunerSidecar(cfg, env={})


DECODE_CONFIGS = [{"max_batch_size": b, "max_concurrency": c} for b, c in ((32, 32), (1, 4), (8, 8), (3, 16), (16, 6), (2, 32))]
PREFILL_CONFIGS = [{"max_batch_size": b} for b in (8, 1, 4, 2, 8, 1)]


async def test_hot_swaps_under_streaming_load_fail_nothing_and_keep_greedy_tokens(stack, store, store_url, tiny_model):
    model, prefix = tiny_model.name, stack.decode[0].config.store_prefix
    decode, prefill = sidecar_for(stack.decode[0], store_url), sidecar_for(stack.prefill[0], store_url)
    prompts = [f"Swap {i}: " + "tokens stream while the batch changes " * (1 + i % 4) for i in range(12)]
    n_tokens = 48
    client = stack.openai(timeout=120)
    chunk_times: list[float] = []
    in_flight: list[int] = []  # decode sequences holding a slot at each swap

    async def stream(i: int) -> list[int]:
        await asyncio.sleep(0.05 * i)  # arrivals spread over the swaps
        ids = []
        events = await client.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=n_tokens, temperature=0, stream=True,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        async for chunk in events:
            ids.extend(chunk.choices[0].model_extra.get("token_ids") or [])
            chunk_times.append(time.monotonic())
        return ids

    async def swap_configs() -> list[tuple]:
        applied = []
        for dec, pre in zip(DECODE_CONFIGS, PREFILL_CONFIGS):
            # A new profile makes another config the best; the sidecars follow it at once.
            await TuningTable.update(store, prefix, [
                point(model, "decode", 1.0, c, 2000.0 if c == dec else 100.0) for c in DECODE_CONFIGS
            ] + [point(model, "prefill", 1.0, c, 9000.0 if c == pre else 100.0) for c in PREFILL_CONFIGS])
            await decode.tick()
            await prefill.tick()
            applied.append((stack.decode[0].runtime.max_batch_size, stack.decode[0].runtime.max_concurrency,
                            stack.prefill[0].runtime.max_batch_size))
            in_flight.append(stack.decode[0].engine.slots.used)
            await asyncio.sleep(0.15)
        return applied

    try:
        results = await asyncio.gather(*(stream(i) for i in range(len(prompts))), swap_configs())
    finally:
        await decode.stop()
        await prefill.stop()
    got, applied = results[:-1], results[-1]
    assert applied == [(d["max_batch_size"], d["max_concurrency"], p["max_batch_size"])
                       for d, p in zip(DECODE_CONFIGS, PREFILL_CONFIGS)]
    assert len(decode.history) >= len(DECODE_CONFIGS) - 1 and len(prefill.history) >= 3
    assert sum(n > 0 for n in in_flight) >= 3, in_flight  # the swaps happened mid-stream
    assert all(len(ids) == n_tokens for ids in got)  # nothing failed or was cut short
    assert got == await asyncio.to_thread(greedy_reference, tiny_model, prompts, [n_tokens] * len(prompts), True)
    gaps = [b - a for a, b in zip(sorted(chunk_times), sorted(chunk_times)[1:])]
    assert max(gaps) < 5.0  # no stall: tokens kept flowing through every swap


async def test_share_change_switches_config_at_once_and_observations_reach_the_table(stack, store, store_url,
                                                                                    tiny_model):
    worker = stack.decode[0]
    model, prefix = tiny_model.name, worker.config.store_prefix
    at_full = {"max_batch_size": 16, "max_concurrency": 16}
    at_half = {"max_batch_size": 4, "max_concurrency": 8}
    await TuningTable.update(store, prefix, [
        point(model, "decode", 1.0, at_full, 3000.0), point(model, "decode", 1.0, at_half, 1000.0),
        point(model, "decode", 0.5, at_full, 900.0, p95=400.0), point(model, "decode", 0.5, at_half, 800.0),
    ])
    # Dwell and hysteresis so large that only a share change can move the config.
    sidecar = sidecar_for(worker, store_url, min_dwell_s=3600.0, hysteresis=10.0, slo_decode_ms=100.0)
    try:
        first = await sidecar.tick()
        assert (first.reason, worker.runtime.max_batch_size, worker.runtime.max_concurrency) == ("best", 16, 16)
        worker.config = replace(worker.config, gpu_share=0.5)  # the pod now has half the device
        switched = await sidecar.tick()
        assert switched.reason == "share_change"
        assert (worker.runtime.max_batch_size, worker.runtime.max_concurrency) == (4, 8)
        assert sidecar.history[-1][1] == 0.5

        # A full batch running: the sidecar writes its step timings back as an online observation.
        client = stack.openai(timeout=120)
        load = [asyncio.ensure_future(client.completions.create(
            model="tiny", prompt=f"observe {i}", max_tokens=60, temperature=0, extra_body={"ignore_eos": True}))
            for i in range(8)]
        deadline = time.monotonic() + 30
        observation = None
        while observation is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            observation = (await sidecar.tick()).observation
        await asyncio.gather(*load)
    finally:
        await sidecar.stop()
    assert observation is not None, "a full batch should have been observed"
    assert (observation.source, observation.share, observation.config) == ("online", 0.5, at_half)
    stored = await TuningTable.load(store, prefix)
    [row] = [p for p in stored.points(model, "decode", "cpu", 0.5) if p.config == at_half]
    assert row.samples >= 6 and row.source == "profile"  # the profile's 5 samples plus observations
    assert row.throughput_tokens_per_s != 800.0  # refined by what the worker really did


async def test_a_config_the_worker_refuses_is_not_retried(stack, store, store_url, tiny_model):
    worker = stack.decode[0]
    model, prefix = tiny_model.name, worker.config.store_prefix
    too_many = {"max_batch_size": 64, "max_concurrency": 64}  # beyond the worker's 32 KV slots
    fits = {"max_batch_size": 8, "max_concurrency": 8}
    await TuningTable.update(store, prefix, [point(model, "decode", 1.0, too_many, 5000.0),
                                             point(model, "decode", 1.0, fits, 1000.0)])
    sidecar = sidecar_for(worker, store_url)
    try:
        await sidecar.tick()  # INVALID_ARGUMENT from the worker
        assert worker.runtime.max_concurrency == 32
        await sidecar.tick()
        assert (worker.runtime.max_batch_size, worker.runtime.max_concurrency) == (8, 8)
        assert sidecar.metrics.registry.get_sample_value("elastune_tuner_config_rejected_total",
                                                         {"stage": "decode"}) == 1
    finally:
        await sidecar.stop()


async def test_the_sidecar_loop_survives_an_unreachable_worker(store_url) -> None:
    sidecar = TunerSidecar(TunerConfig(worker="127.0.0.1:1", store_url=store_url,
                                       store_prefix=f"t-{uuid.uuid4().hex[:6]}", interval_s=0.05), env={})
    await sidecar.start()
    await asyncio.sleep(0.3)
    assert not sidecar._task.done()
    await sidecar.stop()
