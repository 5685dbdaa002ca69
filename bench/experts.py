"""MoE experts benchmark: remote experts' per-step overhead, and throughput as expert-group
replicas grow under Zipf-skewed routing. One run, two parts.

Part 1 (overhead): the tiny MoE model (`elastune model create tiny-moe`; 4 layers, 8 experts,
top-2) decodes a batch of B sequences step by step in this process (1 torch thread), with its
experts colocated, then with them in 2 expert groups served by 2 experts server processes
(1 torch thread each) on this machine. The remote step makes 4 layers x 2 groups = 8
Experts.Forward calls. Median step time over --steps steps after a warm-up.

Part 2 (scaling): experts servers with 8 synthetic experts (hidden 192, intermediate 256) in 4
groups of 2, each server holding each call for --us-per-token microseconds per routed (token,
expert) pair (ELASTUNE_SERVICE_US_PER_TOKEN) so that replicas behave as separate devices on a
machine with 2 cores. --clients threads, each a worker with its own RemoteExperts, run steps of
B tokens x 2 MoE layers with top-2 routing drawn from a Zipf(s) distribution over the experts
(services/experts/synthetic.py). Scenarios, in order on the same servers: s = 0 (uniform) with
one replica per group; s = --skew; s = --skew with the hot experts replicated into other groups
by placement updates (placement.replicate_hottest until balanced, fed with the per-expert token
counters the servers published in the store during the skewed run); s = --skew with the hot group
g0 at 2 then 3 replicas (placement back to even); s = 0 again once the extra g0 replicas have
drained. Throughput: tokens per second through all MoE layers, relative to the mean of the two
uniform runs. Goal: replicating the hot group restores >= 80%.

Prints tables and writes JSON with machine, device and commit to bench/results/.

    python bench/experts.py [--batch 1,8,32] [--steps 40] [--clients 4] [--skew 1.2] [--duration 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/: bench/profile.py must not shadow stdlib profile

from bench.meta import commit, machine  # noqa: E402
from services.common import keys  # noqa: E402
from services.common.logging import configure_logging  # noqa: E402
from services.common.store import EmbeddedStore, connect  # noqa: E402
from services.engine.kv_cache import KvCache  # noqa: E402
from services.engine.loader import load_model  # noqa: E402
from services.engine.tiny_moe import ensure_tiny_moe_model  # noqa: E402
from services.experts.client import RemoteExperts  # noqa: E402
from services.experts.config import ExpertsClientConfig  # noqa: E402
from services.experts.placement import Placement, replicate_hottest  # noqa: E402
from services.experts.placement_store import read_placement, write_placement  # noqa: E402
from services.experts.synthetic import ZipfRouter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NUM_EXPERTS, TOP_K, HIDDEN, LAYERS = 8, 2, 192, 2


class Loop:
    """An asyncio loop on a thread: RemoteExperts refreshes its view there, as in a worker."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


class Servers:
    def __init__(self, store_url: str, prefix: str, env: dict[str, str]):
        self.env = {**os.environ, "REDIS_URL": store_url, "ELASTUNE_STORE_PREFIX": prefix, "ELASTUNE_THREADS": "1",
                    "ELASTUNE_REPORT_INTERVAL_S": "0.25", "ELASTUNE_HEARTBEAT_TTL_S": "1.5", **env}
        self.procs: list[subprocess.Popen] = []

    def start(self, group: str) -> None:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", "experts"], cwd=REPO,
            env={**self.env, "ELASTUNE_EXPERT_GROUP": group}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))

    def stop_last(self, n: int) -> None:
        """SIGTERM the n newest servers (they drain) and wait for them."""
        newest, self.procs = self.procs[-n:], self.procs[:-n]
        for p in newest:
            p.terminate()
        for p in newest:
            p.wait(timeout=60)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                print(f"experts server {p.pid} did not stop within 60 s; killed", flush=True)
                p.kill()
                p.wait()


def client(loop: Loop, store_url: str, prefix: str) -> RemoteExperts:
    remote = RemoteExperts(ExpertsClientConfig(store_url=store_url, store_prefix=prefix, refresh_s=0.25))
    loop.run(remote.start())
    return remote


def wait_replicas(loop: Loop, remote: RemoteExperts, want: dict[str, int], timeout_s: float = 120,
                  exact: bool = False) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        loop.run(remote.refresh())
        view = remote.view
        counts = {g: len(view.replicas.get(g, ())) for g in want} if view is not None else {}
        if counts and all(counts[g] == n if exact else counts[g] >= n for g, n in want.items()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"experts servers did not register: want {want}")


# ---- part 1: per-step overhead of remote experts ----

def decode_step_ms(model, batch: int, steps: int, remote: RemoteExperts | None = None) -> tuple[float, int, float]:
    """Median decode step ms; with `remote`, also its calls and transport ms during the steps."""
    prompt = 32
    gen = torch.Generator().manual_seed(batch)
    tokens = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=gen)
    logits, kv = model.prefill(tokens, torch.full((batch,), prompt))
    cache = KvCache(model.config, batch, prompt + steps + 8, torch.float32, torch.device("cpu"))
    for slot in range(batch):
        for layer, (k, v) in enumerate(kv):
            cache.write_prompt(slot, layer, torch.stack((k[slot], v[slot])))
    last = logits.argmax(-1)
    slots = torch.arange(batch)
    calls, transport = (remote.calls, remote.transport_ms) if remote else (0, 0.0)
    times = []
    for step in range(steps):
        positions = torch.full((batch,), prompt + step)
        start = time.perf_counter()
        out = model.decode(last, positions, slots, cache, (0, batch), prompt + step + 1)
        times.append((time.perf_counter() - start) * 1000)
        last = out.argmax(-1)
    if remote is None:
        return statistics.median(times[3:]), 0, 0.0
    return statistics.median(times[3:]), remote.calls - calls, remote.transport_ms - transport


def overhead(store_url: str, batches: list[int], steps: int) -> list[dict]:
    prefix = "bench-experts-ckpt"
    model_dir = ensure_tiny_moe_model()
    servers = Servers(store_url, prefix, {"ELASTUNE_MODEL_DIR": str(model_dir), "ELASTUNE_NUM_GROUPS": "2"})
    loop = Loop()
    rows = []
    try:
        for g in ("g0", "g1"):
            servers.start(g)
        model = load_model(model_dir, dtype="float32")
        remote = client(loop, store_url, prefix)
        wait_replicas(loop, remote, {"g0": 1, "g1": 1})
        for batch in batches:
            model.use_experts(None)
            local, _, _ = decode_step_ms(model, batch, steps)
            model.use_experts(remote)
            far, calls, transport = decode_step_ms(model, batch, steps, remote)
            rows.append({"batch": batch, "colocated_ms": local, "remote_ms": far, "difference_ms": far - local,
                         "calls_per_step": calls / steps, "transport_ms_per_call": transport / calls})
        loop.run(remote.stop())
    finally:
        servers.stop()
    return rows


# ---- part 2: throughput as expert-group replicas grow under skew ----

def run_clients(remotes: list[RemoteExperts], skew: float, batch: int, duration_s: float) -> float:
    """Tokens/s through LAYERS MoE layers, all clients together, after a 1 s warm-up."""
    stop = threading.Event()
    counted = [0] * len(remotes)
    counting = threading.Event()

    def worker(i: int, remote: RemoteExperts) -> None:
        router = ZipfRouter(NUM_EXPERTS, TOP_K, skew, seed=i)
        x = torch.randn(batch, HIDDEN, generator=torch.Generator().manual_seed(i))
        while not stop.is_set():
            for layer in range(LAYERS):
                remote.forward(layer, x, *router.route(batch))
            if counting.is_set():
                counted[i] += batch

    threads = [threading.Thread(target=worker, args=(i, r)) for i, r in enumerate(remotes)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    counting.set()
    start = time.perf_counter()
    time.sleep(duration_s)
    total = sum(counted)
    elapsed = time.perf_counter() - start
    stop.set()
    for t in threads:
        t.join()
    return total / elapsed


async def expert_counts(store, prefix: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in (await store.hgetall(keys.expert_tokens(prefix))).items()}


def scaling(store_url: str, clients: int, skew: float, batch: int, duration_s: float, us_per_token: float) -> list[dict]:
    prefix = "bench-experts-synth"
    groups = [f"g{i}" for i in range(4)]
    servers = Servers(store_url, prefix, {
        "ELASTUNE_SYNTHETIC_EXPERTS": str(NUM_EXPERTS), "ELASTUNE_SYNTHETIC_HIDDEN_SIZE": str(HIDDEN),
        "ELASTUNE_NUM_GROUPS": "4", "ELASTUNE_SERVICE_US_PER_TOKEN": str(us_per_token),
    })
    loop = Loop()
    store = connect(store_url)
    rows = []

    def row(name: str, s: float, replicas: dict[str, int], placement: Placement) -> None:
        wait_replicas(loop, remotes[0], replicas)
        for r in remotes:
            loop.run(r.refresh())
        tps = run_clients(remotes, s, batch, duration_s)
        rows.append({"scenario": name, "skew": s, "expert_counts_total": loop.run(expert_counts(store, prefix)), "replicas": dict(replicas), "placement_version": placement.version,
                     "groups": {g: list(e) for g, e in placement.groups.items()}, "tokens_per_s": tps})
        print(f"  {name}: {tps:,.0f} tok/s", flush=True)

    try:
        for g in groups:
            servers.start(g)
        remotes = [client(loop, store_url, prefix) for _ in range(clients)]
        one_each = {g: 1 for g in groups}
        wait_replicas(loop, remotes[0], one_each)
        even = loop.run(read_placement(store, prefix))
        row("uniform, 1 replica per group", 0.0, one_each, even)
        before = loop.run(expert_counts(store, prefix))
        row(f"skew {skew}, 1 replica per group", skew, one_each, even)
        time.sleep(0.6)  # the servers' last counts reach the store
        after = loop.run(expert_counts(store, prefix))
        # hot experts copied into other groups by placement updates, chosen from the per-expert
        # token counters the servers published during the skewed run
        rates = {e: float(after.get(e, 0) - before.get(e, 0)) for e in range(NUM_EXPERTS)}
        placement = even
        while (better := replicate_hottest(rates, placement)) is not None:
            placement = better
        loop.run(write_placement(store, prefix, placement))
        row(f"skew {skew}, hot experts replicated (placement)", skew, one_each, placement)
        restored = Placement(even.num_experts, even.groups, placement.version + 1)
        loop.run(write_placement(store, prefix, restored))
        for n in (2, 3):
            servers.start("g0")
            row(f"skew {skew}, hot group g0 x{n}", skew, {**one_each, "g0": n}, restored)
        # the uniform baseline again, on the same 4 servers (the machine's load drifts)
        servers.stop_last(2)
        wait_replicas(loop, remotes[0], one_each, exact=True)
        row("uniform, 1 replica per group (again)", 0.0, one_each, restored)
        for r in remotes:
            loop.run(r.stop())
    finally:
        loop.run(store.aclose())
        servers.stop()
    base = (rows[0]["tokens_per_s"] + rows[-1]["tokens_per_s"]) / 2
    for r in rows:
        r["relative_to_uniform"] = r["tokens_per_s"] / base
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,8,32", help="decode batch sizes for the overhead part")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--clients", type=int, default=4, help="workers calling the experts in the scaling part")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per step per client in the scaling part")
    parser.add_argument("--skew", type=float, default=1.2)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--us-per-token", type=float, default=2000.0,
                        help="emulated device time per routed pair; large enough that the device, not this "
                             "2-core machine's Python, is the bottleneck")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    configure_logging("bench")
    torch.set_num_threads(1)
    store = EmbeddedStore()
    url = store.start()
    try:
        print("part 1: remote experts' per-step overhead (tiny MoE, decode)", flush=True)
        over = overhead(url, [int(b) for b in args.batch.split(",")], args.steps)
        print("part 2: throughput vs expert-group replicas under Zipf skew", flush=True)
        scale = scaling(url, args.clients, args.skew, args.tokens, args.duration, args.us_per_token)
    finally:
        store.stop()

    print("\n| batch | colocated ms/step | remote ms/step | remote - colocated ms | calls/step | transport ms/call |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in over:
        print(f"| {r['batch']} | {r['colocated_ms']:.2f} | {r['remote_ms']:.2f} | {r['difference_ms']:.2f} | "
              f"{r['calls_per_step']:.1f} | {r['transport_ms_per_call']:.3f} |")
    print("\n| scenario | tokens/s | vs uniform |")
    print("| --- | ---: | ---: |")
    for r in scale:
        print(f"| {r['scenario']} | {r['tokens_per_s']:,.0f} | {r['relative_to_uniform']:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"experts-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "benchmark": "experts", "machine": machine(), "load_average": os.getloadavg(), "device": "cpu", "commit": commit(), "args": vars(args),
        "overhead": over, "scaling": scale,
    }, indent=2) + "\n")
    print(f"\nload average (1, 5, 15 min): {os.getloadavg()}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
