"""KEDA external scaler benchmark: GetMetrics latency under many concurrent pollers.

Starts the embedded store and the scaler in this process (127.0.0.1, any free port), publishes
a few load reports (prefill, decode, gateway) through WorkerRegistration.publish(), then runs
`--pollers` concurrent GetMetrics pollers in a child process (its own event loop, so client
work does not run on the scaler's loop) for `--duration` seconds after a 1 s warm-up, over
`--objects` ScaledObjects (half decode in desired mode, half prefill in raw mode; the pollers
share them round-robin). One run per (decision interval, pause): every object takes a fresh
decision once per decision interval (KEDA/HPA usually poll less often than the default 5 s, so
then most calls decide; 3600 measures the stored-decision path alone); each poller pauses that
long between its calls (0: closed loop, a throughput ceiling). Prints a table and writes JSON with
machine, device and commit to bench/results/.

    python bench/scaler.py [--pollers 100] [--objects 100] [--duration 10] [--interval 1,0.2,0]
        [--decision-interval 5,3600] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing as mp
import random
import sys
import time
from pathlib import Path

import grpc

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/: bench/profile.py must not shadow stdlib profile

from services.common.load_report import LoadReport  # noqa: E402
from services.common.logging import configure_logging  # noqa: E402
from services.common.registry import WorkerRegistration  # noqa: E402
from services.common.store import EmbeddedStore, connect  # noqa: E402
from services.proto import externalscaler_pb2 as pb  # noqa: E402
from services.proto import externalscaler_pb2_grpc as pb_grpc  # noqa: E402
from services.scaler.config import ScalerConfig  # noqa: E402
from services.scaler.server import ScalerService  # noqa: E402
from services.scaler.signals import ALL_REASONS  # noqa: E402
from bench.meta import commit, machine, write_json  # noqa: E402

PREFIX = "bench-scaler"
WARMUP_S = 1.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")



def requests(objects: int, decision_interval_s: float) -> list[pb.GetMetricsRequest]:
    out = []
    for i in range(objects):
        if i % 2 == 0:
            meta, metric = {"stage": "decode"}, "decode-desired-replicas"
        else:
            meta, metric = {"stage": "prefill", "mode": "raw"}, "prefill-load-tokens-per-second"
        ref = pb.ScaledObjectRef(name=f"so-{i}", namespace="bench", scalerMetadata={
            **meta, "storePrefix": PREFIX, "decisionIntervalSeconds": str(decision_interval_s)})
        out.append(pb.GetMetricsRequest(scaledObjectRef=ref, metricName=metric))
    return out


async def poll(
    address: str, pollers: int, objects: int, duration_s: float, interval_s: float, decision_s: float, seed: int
) -> dict:
    rng = random.Random(seed)
    reqs = requests(objects, decision_s)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        await channel.channel_ready()
        start = time.perf_counter()
        measure_from, end = start + WARMUP_S, start + WARMUP_S + duration_s

        async def poller(index: int) -> None:
            if interval_s:
                await asyncio.sleep(rng.uniform(0, interval_s))  # spread the pollers out
            k = index
            while (now := time.perf_counter()) < end:
                try:
                    await stub.GetMetrics(reqs[k % len(reqs)])
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                else:
                    if now >= measure_from:
                        latencies.append(time.perf_counter() - now)
                k += pollers
                if interval_s:
                    await asyncio.sleep(interval_s * rng.uniform(0.9, 1.1))

        await asyncio.gather(*(poller(i) for i in range(pollers)))
    ms = [s * 1000 for s in latencies]
    return {
        "pollers": pollers, "objects": objects, "interval_s": interval_s, "decision_interval_s": decision_s,
        "duration_s": duration_s,
        "calls": len(ms), "calls_per_s": len(ms) / duration_s, "errors": errors,
        "latency_ms": {"p50": pct(ms, 50), "p95": pct(ms, 95), "p99": pct(ms, 99), "max": max(ms, default=float("nan"))},
    }


def poll_in_child(address: str, args: tuple, conn) -> None:
    conn.send(asyncio.run(poll(address, *args)))
    conn.close()


async def publish_reports(url: str) -> None:
    store = connect(url)
    reports = [LoadReport(f"p{i}", "prefill", "127.0.0.1:1", "h", "tiny", time.time(), queue_len=2, queued_tokens=300,
                          prompt_tokens_per_s=900.0) for i in range(2)]
    reports += [LoadReport(f"d{i}", "decode", "127.0.0.1:1", "h", "tiny", time.time(), running_seqs=12,
                           kv_used_tokens=3000, kv_capacity_tokens=8192, output_tokens_per_s=700.0) for i in range(3)]
    reports.append(LoadReport("g0", "gateway", "127.0.0.1:1", "h", "tiny", time.time(), queue_len=4, queued_tokens=900,
                              running_seqs=36, prompt_tokens_per_s=1800.0, output_tokens_per_s=2100.0))
    for r in reports:
        await WorkerRegistration(store, PREFIX, lambda r=r: r, ttl_s=3600.0).publish()
    await store.aclose()


def decisions_taken(service: ScalerService) -> float:
    sample = service.metrics.registry.get_sample_value
    return sum(
        sample("elastune_scaler_decisions_total", {"stage": stage, "reason": reason}) or 0
        for stage in ("prefill", "decode") for reason in ALL_REASONS
    )


async def run(args: argparse.Namespace, url: str) -> list[dict]:
    await publish_reports(url)
    service = ScalerService(ScalerConfig(port=0, store_url=url))
    await service.start()
    results, decided = [], 0.0
    try:
        ctx = mp.get_context("spawn")
        for decision_s, interval in itertools.product(args.decision_interval, args.interval):
            parent, child = ctx.Pipe(duplex=False)
            poll_args = (args.pollers, args.objects, args.duration, interval, decision_s, args.seed)
            proc = ctx.Process(target=poll_in_child, args=(f"127.0.0.1:{service.port}", poll_args, child))
            proc.start()
            result = await asyncio.to_thread(parent.recv)
            await asyncio.to_thread(proc.join)
            taken = decisions_taken(service)
            result["decisions"], decided = taken - decided, taken  # in this run, warm-up included
            results.append(result)
    finally:
        await service.stop(grace_s=1.0)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pollers", type=int, default=100)
    ap.add_argument("--objects", type=int, default=100, help="distinct ScaledObjects the pollers share")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (after 1 s warm-up)")
    ap.add_argument("--interval", default="1,0.2,0", help="comma-separated pauses between a poller's calls (s)")
    ap.add_argument("--decision-interval", default="5,3600",
                    help="comma-separated decisionIntervalSeconds (3600: every measured call reads a stored decision)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    args.interval = [float(x) for x in args.interval.split(",")]
    args.decision_interval = [float(x) for x in args.decision_interval.split(",")]
    configure_logging("bench", level="WARNING")  # one decision log line per object per interval is noise here
    store = EmbeddedStore()
    url = store.start()
    try:
        runs = asyncio.run(run(args, url))
    finally:
        store.stop()
    out = {
        "machine": machine(),
        "device": "cpu", "commit": commit(), "seed": args.seed, "runs": runs,
    }
    print(f"\nscaler GetMetrics, {args.pollers} pollers over {args.objects} ScaledObjects, commit {out['commit']}")
    print(f"{'decision s':>10} {'pause s':>8} {'calls/s':>8} {'decided':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}"
          f" {'max ms':>7} {'errors':>6}")
    for r in runs:
        lat = r["latency_ms"]
        print(f"{r['decision_interval_s']:>10g} {r['interval_s']:>8g} {r['calls_per_s']:>8.0f} {r['decisions']:>8.0f}"
              f" {lat['p50']:>7.2f}"
              f" {lat['p95']:>7.2f} {lat['p99']:>7.2f} {lat['max']:>7.2f} {sum(r['errors'].values()):>6}")
    path = Path(args.out) / f"scaler-{out['commit']}.json"
    write_json(path, out)


if __name__ == "__main__":
    main()
