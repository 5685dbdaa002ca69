"""The scaler takes per-pod capacity from the tuning table at the pods' share."""

from __future__ import annotations

from services.tuner.table import ProfilePoint, TuningTable

from tests.scaler.test_server import publish, ref, report, serving, value_of


def point(share: float, batch: int, thr: float, p95: float) -> ProfilePoint:
    return ProfilePoint(model="tiny", stage="decode", device="cpu", share=share,
                        config={"max_batch_size": batch, "max_concurrency": batch},
                        throughput_tokens_per_s=thr, latency_p50_ms=p95, latency_p95_ms=p95,
                        workload={"context_len": 128})


async def test_desired_replicas_use_the_table_capacity_at_the_pods_share(store_url, store, prefix) -> None:
    await TuningTable.update(store, prefix, [
        point(0.5, 8, 500.0, 20.0), point(0.5, 64, 900.0, 120.0),  # batch 64 misses a 50 ms ITL SLO
        point(1.0, 8, 1000.0, 15.0), point(1.0, 64, 3000.0, 45.0),
    ])
    async with serving(store_url) as (_, stub):
        # The metadata's 100k tokens/s per pod would ask for one pod; the table says 500 at half a
        # device within the 50 ms SLO: 2 x 1200 tok/s over 500 x 0.8 usable is 6 pods.
        await publish(store, prefix, *(report(f"d{i}", "decode", output_tokens_per_s=1200.0, gpu_share=0.5)
                                       for i in range(2)))
        scaled = ref(prefix, stage="decode", tokensPerSecondPerPod="100000", sloItlSeconds="0.05")
        assert (await value_of(stub, scaled)).metricValueFloat == 6.0


async def test_full_share_pods_get_the_full_share_capacity_and_unknown_models_the_metadata(store_url, store,
                                                                                          prefix) -> None:
    await TuningTable.update(store, prefix, [point(0.5, 8, 500.0, 20.0), point(1.0, 64, 3000.0, 45.0)])
    async with serving(store_url) as (_, stub):
        await publish(store, prefix, *(report(f"d{i}", "decode", output_tokens_per_s=3000.0, gpu_share=1.0)
                                       for i in range(2)))
        # 6000 tok/s over 3000 x 0.8 = 2400 usable: 3 pods (the metadata's 1000 would say 8)
        assert (await value_of(stub, ref(prefix, stage="decode", sloItlSeconds="0.05"))).metricValueFloat == 3.0
        # prefill is not in the table: the metadata's 1000 tok/s per pod (800 usable) applies
        await publish(store, prefix, report("p0", "prefill", prompt_tokens_per_s=2000.0, gpu_share=1.0))
        assert (await value_of(stub, ref(prefix, stage="prefill"))).metricValueFloat == 3.0
