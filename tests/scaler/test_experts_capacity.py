"""An expert group's per-pod capacity comes from the tuning table's "experts" rows."""

from __future__ import annotations

from services.tuner.table import ProfilePoint, TuningTable

from tests.scaler.test_server import publish, ref, report, serving, value_of


def point(share: float, micro_batch: int, thr: float, p95: float) -> ProfilePoint:
    return ProfilePoint(model="tiny", stage="experts", device="cpu", share=share,
                        config={"max_batch_size": micro_batch},
                        throughput_tokens_per_s=thr, latency_p50_ms=p95, latency_p95_ms=p95,
                        workload={"call_tokens": 256})


async def test_expert_group_capacity_is_the_tables_best_within_the_itl_slo_at_the_pods_share(store_url, store,
                                                                                               prefix) -> None:
    await TuningTable.update(store, prefix, [
        point(0.5, 64, 5000.0, 8.0), point(0.5, 256, 20000.0, 30.0),  # 256 misses a 10 ms ITL SLO
        point(1.0, 64, 8000.0, 5.0), point(1.0, 256, 40000.0, 9.0),
    ])
    async with serving(store_url) as (_, stub):
        # Two servers of group g0 at half a device, 6000 routed tokens/s each: the metadata's
        # 100k per pod would keep 2 pods; the table says 5000 within 10 ms, 4000 usable: 3 pods.
        await publish(store, prefix, *(report(f"e{i}", "experts/g0", prompt_tokens_per_s=6000.0, gpu_share=0.5)
                                       for i in range(2)))
        scaled = ref(prefix, stage="experts", group="g0", tokensPerSecondPerPod="100000", sloItlSeconds="0.01")
        assert (await value_of(stub, scaled)).metricValueFloat == 3.0
        # A looser ITL SLO admits the 256-token micro-batch: 20000 (16000 usable) per pod, 1 pod
        loose = ref(prefix, stage="experts", group="g0", tokensPerSecondPerPod="100000", sloItlSeconds="0.05")
        loose.name = "so-loose"  # its own ScaledObject: the first one's scale-down window would hold 3
        assert (await value_of(stub, loose)).metricValueFloat == 1.0
