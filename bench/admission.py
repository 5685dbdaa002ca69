"""What the gateway's door costs: the admission rule over fleets of growing size (the fleet
summary, once per directory refresh, and the decision, once per request), a local token
bucket, and the store-shared bucket (one Lua call on the embedded Valkey).

Seeded hand-made load reports; each figure is the median of `--repeat` timed batches after a
warm-up. Prints a table and writes JSON with machine, device and commit to bench/results/.

    python bench/admission.py [--fleets 10,100,1000] [--calls 2000] [--repeat 5] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/: bench/profile.py must not shadow stdlib profile

from bench.meta import commit, machine, write_json  # noqa: E402
from services.common.load_report import LoadReport  # noqa: E402
from services.common.logging import configure_logging  # noqa: E402
from services.common.store import EmbeddedStore, connect  # noqa: E402
from services.gateway.admission import AdmissionPolicy, AdmissionRequest, decide, summarize  # noqa: E402
from services.gateway.budget import TokenBudgets  # noqa: E402
from services.gateway.shared_budget import SharedBudgets  # noqa: E402


def fleet(n: int, rng: random.Random) -> tuple[list[LoadReport], list[LoadReport]]:
    """n decode and n prefill workers with random load; most have room, so decide() scans them all."""
    decode = [LoadReport(f"d{i}", "decode", "a", "h", "m", 0.0, queued_tokens=rng.randrange(0, 2000),
                         kv_used_tokens=rng.randrange(0, 40_000), kv_capacity_tokens=65_536,
                         output_tokens_per_s=rng.uniform(100, 3000)) for i in range(n)]
    prefill = [LoadReport(f"p{i}", "prefill", "a", "h", "m", 0.0, queued_tokens=rng.randrange(0, 4000),
                          prompt_tokens_per_s=rng.uniform(1000, 20_000)) for i in range(n)]
    return prefill, decode


def timed_us(fn, calls: int, repeat: int) -> float:
    fn()
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


async def shared_bucket(url: str, calls: int, concurrency: int) -> dict:
    store = connect(url)
    budgets = SharedBudgets(store, "bench", tokens_per_s=1e9, burst_tokens=1e12)
    await budgets.charge("warm", 1)
    lat: list[float] = []

    async def one(i: int) -> None:
        for j in range(calls // concurrency):
            start = time.perf_counter()
            await budgets.charge(f"key-{(i * 7 + j) % 64}", 100)
            lat.append((time.perf_counter() - start) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    await store.aclose()
    lat.sort()
    return {"concurrency": concurrency, "calls_per_s": len(lat) / elapsed,
            "p50_ms": lat[len(lat) // 2], "p95_ms": lat[int(len(lat) * 0.95)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fleets", default="10,100,1000")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    configure_logging("bench", level="WARNING")
    rng = random.Random(args.seed)
    policy = AdmissionPolicy()
    req = AdmissionRequest(prompt_tokens=500, max_tokens=200, deadline_s=60.0)
    decide_us, summarize_us = {}, {}
    for n in (int(x) for x in args.fleets.split(",")):
        prefill, decode = fleet(n, rng)
        calls = max(args.calls // max(n // 10, 1), 50)
        # summarize() runs once per directory refresh (every refresh_s); decide() once per request
        summarize_us[n] = timed_us(lambda: summarize(prefill, decode, policy), calls, args.repeat)
        view = summarize(prefill, decode, policy)
        decide_us[n] = timed_us(lambda: decide(req, view, policy), args.calls, args.repeat)
    local = TokenBudgets(1e9, 1e12)
    keys = [f"key-{i}" for i in range(64)]
    it = iter(range(10**9))
    local_us = timed_us(lambda: local.charge(keys[next(it) % 64], 100), args.calls * 10, args.repeat)
    store = EmbeddedStore()
    url = store.start()
    try:
        shared = [asyncio.run(shared_bucket(url, args.calls, c)) for c in (1, 32)]
    finally:
        store.stop()
    out = {"machine": machine(), "device": "cpu", "commit": commit(), "seed": args.seed,
           "decide_us_by_fleet": decide_us, "summarize_us_by_fleet": summarize_us, "local_bucket_us": local_us, "shared_bucket": shared}
    print(f"\ngateway door, commit {out['commit']}")
    print(f"{'admission decide() per request':<32} " + "  ".join(f"{n}/stage: {us:.2f} us" for n, us in decide_us.items()))
    print(f"{'summarize() per refresh':<32} " + "  ".join(f"{n}/stage: {us:.1f} us" for n, us in summarize_us.items()))
    print(f"{'local token bucket charge':<32} {local_us:.2f} us")
    for r in shared:
        print(f"{'shared bucket (store) charge':<32} concurrency {r['concurrency']:>2}: {r['calls_per_s']:>7.0f} calls/s,"
              f" p50 {r['p50_ms']:.3f} ms, p95 {r['p95_ms']:.3f} ms")
    path = Path(args.out) / f"admission-{out['commit']}.json"
    write_json(path, out)


if __name__ == "__main__":
    main()
