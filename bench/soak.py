"""Bounded soak of the local stack: ~80% of measured capacity for a fixed time; no token lost or
repeated, resident memory flat.

1. Starts `elastune up` (tiny model unless --model; 1 prefill + 1 decode unless told otherwise).
2. Builds a pool of prompts (workload length mix scaled to the tiny model) and records each one's greedy
   output on the idle stack: the reference every soak request is checked against, token for token.
3. Measures capacity: closed-loop ramp over --ramp-concurrency, each level --ramp-s seconds; capacity
   is the best completed requests/s (or take --capacity RPS).
4. Soaks: Poisson arrivals at --load x capacity for --duration seconds (open loop, bench/workloads.py),
   each request a random pool prompt, streamed; samples the RSS of every process of the stack.
5. Prints a table and writes JSON (machine, device, commit) to --out.

    python bench/soak.py                      # 10 minutes
    python bench/soak.py --duration 60        # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not bench/ (bench/profile.py: stdlib profile)

from bench import meta, workloads  # noqa: E402
from bench.loadgen import prompt_ids  # noqa: E402
from bench.procs import RssSampler  # noqa: E402
from services.engine.tiny import ensure_tiny_model  # noqa: E402


@dataclass
class Outcome:
    pool_index: int
    ok: bool = False
    error: str = ""
    tokens: list[int] = field(default_factory=list)
    ttft_s: float | None = None
    e2e_s: float = 0.0


async def stream(session: aiohttp.ClientSession, url: str, body: dict, pool_index: int) -> Outcome:
    """One streamed completion, every token id as it arrived."""
    out = Outcome(pool_index)
    start = time.monotonic()
    finish = None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return out
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if event.get("error"):
                    out.error = str(event["error"])[:200]
                    return out
                for choice in event.get("choices") or []:
                    if choice.get("token_ids") and out.ttft_s is None:
                        out.ttft_s = time.monotonic() - start
                    out.tokens.extend(choice.get("token_ids") or [])
                    finish = choice.get("finish_reason") or finish
        out.ok = finish == "length"
        if not out.ok:
            out.error = f"finish_reason {finish!r}"
    except Exception as exc:  # noqa: BLE001 - every failure is counted, none retried
        out.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        out.e2e_s = time.monotonic() - start
    return out


class Soak:
    def __init__(self, base: str, pool: list[tuple[list[int], int]], timeout_s: float):
        self.url = base + "/v1/completions"
        self.pool = pool
        self.timeout_s = timeout_s
        self.expected: list[list[int]] = []

    def body(self, i: int) -> dict:
        prompt, max_tokens = self.pool[i]
        return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "return_token_ids": True}

    def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=self.timeout_s))

    async def reference(self, concurrency: int = 4) -> None:
        async with self.session() as s:
            outs: list[Outcome] = []
            for start in range(0, len(self.pool), concurrency):
                idx = range(start, min(start + concurrency, len(self.pool)))
                outs += await asyncio.gather(*(stream(s, self.url, self.body(i), i) for i in idx))
        bad = [o.error for o in outs if not o.ok]
        if bad:
            raise RuntimeError(f"reference run failed: {bad[:3]}")
        self.expected = [o.tokens for o in outs]

    async def closed_loop(self, concurrency: int, seconds: float, rng: np.random.Generator) -> dict:
        done, tokens = 0, 0
        end = time.monotonic() + seconds

        async def client(s):
            nonlocal done, tokens
            while time.monotonic() < end:
                i = int(rng.integers(len(self.pool)))
                o = await stream(s, self.url, self.body(i), i)
                if o.ok:
                    done += 1
                    tokens += len(o.tokens)

        start = time.monotonic()
        async with self.session() as s:
            await asyncio.gather(*(client(s) for _ in range(concurrency)))
        wall = time.monotonic() - start
        return {"concurrency": concurrency, "requests_per_s": done / wall, "tokens_per_s": tokens / wall}

    async def open_loop(self, arrivals: list[float], rng: np.random.Generator) -> list[Outcome]:
        picks = rng.integers(len(self.pool), size=len(arrivals))
        tasks = []
        async with self.session() as s:
            t0 = time.monotonic()
            for at, i in zip(arrivals, picks):
                delay = t0 + at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(stream(s, self.url, self.body(int(i)), int(i))))
            return list(await asyncio.gather(*tasks))

    def verdict(self, outs: list[Outcome]) -> dict:
        counts = {"requests": len(outs), "ok": 0, "failed": 0, "lost_tokens": 0, "duplicated_tokens": 0,
                  "mismatched": 0}
        errors: dict[str, int] = {}
        for o in outs:
            want = self.expected[o.pool_index]
            if o.error:
                counts["failed"] += 1
                errors[o.error[:80]] = errors.get(o.error[:80], 0) + 1
            if len(o.tokens) < len(want):
                counts["lost_tokens"] += len(want) - len(o.tokens) if not o.error else 0
            elif len(o.tokens) > len(want):
                counts["duplicated_tokens"] += len(o.tokens) - len(want)
            elif o.tokens != want:
                counts["mismatched"] += 1
            counts["ok"] += o.ok and o.tokens == want
        counts["errors"] = errors
        return counts


def build_pool(n: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """Prompt and output lengths from the workload mix, scaled down to the tiny model's 2k context."""
    rng = np.random.default_rng(seed)
    prompts = workloads.mixture_prompt_lengths(n, rng, short_median=48, long_median=384, max_tokens=1024)
    outputs = workloads.longtail_output_lengths(n, rng, median=64, sigma=0.6, max_tokens=256)
    return [(prompt_ids(i, int(p), vocab, seed), int(o)) for i, (p, o) in enumerate(zip(prompts, outputs))]


def start_stack(args, log_path: Path) -> tuple[subprocess.Popen, str]:
    from services.launcher import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "services.cli", "up", "--port", str(port), "--prefill", str(args.prefill),
           "--decode", str(args.decode)] + (["--model", args.model] if args.model else [])
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while "OpenAI API" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"elastune up did not start; see {log_path}")
        time.sleep(0.5)
    return proc, f"http://127.0.0.1:{port}"


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def print_memory(memory: list[dict]) -> None:
    print(f"{'process':<10} {'pid':>7} {'RSS start':>10} {'end':>8} {'max':>8} {'slope MiB/min':>14} "
          f"{'growth MiB':>11} {'flat':>5}")
    for m in memory:
        print(f"{m['role']:<10} {m['pid']:>7} {m['start_mib']:>10.1f} {m['end_mib']:>8.1f} {m['max_mib']:>8.1f} "
              f"{m['slope_mib_per_min']:>14.3f} {m['growth_mib']:>11.2f} {str(m['flat']):>5}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0, help="soak seconds")
    ap.add_argument("--load", type=float, default=0.8, help="fraction of measured capacity")
    ap.add_argument("--capacity", type=float, default=0.0, help="requests/s; 0: measure with a ramp")
    ap.add_argument("--ramp-concurrency", default="4,16,32")
    ap.add_argument("--ramp-s", type=float, default=15.0)
    ap.add_argument("--pool", type=int, default=48, help="distinct prompts (each checked against its reference)")
    ap.add_argument("--prefill", type=int, default=1)
    ap.add_argument("--decode", type=int, default=1)
    ap.add_argument("--model", default="")
    ap.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = meta.commit()
    proc, base = start_stack(args, out / f"soak-{commit}-up.log")
    try:
        model_dir = args.model or str(ensure_tiny_model())
        vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
        soak = Soak(base, build_pool(args.pool, vocab, args.seed), timeout_s=300)
        rng = np.random.default_rng(args.seed)
        asyncio.run(soak.reference())
        ramp = []
        if args.capacity <= 0:
            for c in (int(x) for x in args.ramp_concurrency.split(",")):
                ramp.append(asyncio.run(soak.closed_loop(c, args.ramp_s, rng)))
                print(f"ramp: {c:>3} streams  {ramp[-1]['requests_per_s']:6.2f} req/s  "
                      f"{ramp[-1]['tokens_per_s']:7.0f} tok/s", flush=True)
        capacity = args.capacity or max(r["requests_per_s"] for r in ramp)
        rate = args.load * capacity
        arrivals = [float(a) for a in workloads.poisson_arrivals(rate, args.duration, rng)]
        print(f"soak: {len(arrivals)} requests at {rate:.2f} req/s ({args.load:.0%} of {capacity:.2f}) "
              f"for {args.duration:.0f} s", flush=True)
        sampler = RssSampler(proc.pid, args.sample_s)
        sampler.start()
        t0 = time.monotonic()
        outs = asyncio.run(soak.open_loop(arrivals, rng))
        wall = time.monotonic() - t0
        sampler.stop()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # the launcher stops every process it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

    verdict = soak.verdict(outs)
    good = [o for o in outs if o.ok]
    memory = sampler.summary(warmup_fraction=0.2)
    results = {
        "benchmark": "soak", "commit": commit, "machine": meta.machine(), "device": "cpu",
        "stack": {"prefill": args.prefill, "decode": args.decode, "model": args.model or "tiny"},
        "ramp": ramp, "capacity_requests_per_s": capacity, "load_fraction": args.load,
        "offered_requests_per_s": rate, "duration_s": args.duration, "wall_s": wall,
        "tokens_per_s": sum(len(o.tokens) for o in outs) / wall, "verdict": verdict,
        "ttft_ms": {q: pct([o.ttft_s for o in good if o.ttft_s is not None], q) for q in (50, 95, 99)},
        "e2e_ms": {q: pct([o.e2e_s for o in good], q) for q in (50, 95, 99)},
        "memory": memory, "rss_samples": sampler.samples,
    }
    print(f"\nelastune soak, commit {commit}: {len(outs)} requests in {wall:.0f} s at {rate:.2f} req/s "
          f"({args.load:.0%} of {capacity:.2f} req/s measured), {results['tokens_per_s']:.0f} output tok/s")
    print(f"ok {verdict['ok']}  failed {verdict['failed']}  lost tokens {verdict['lost_tokens']}  "
          f"duplicated tokens {verdict['duplicated_tokens']}  mismatched streams {verdict['mismatched']}  "
          f"errors {verdict['errors']}")
    print(f"TTFT p50/p95/p99 {results['ttft_ms'][50]} / {results['ttft_ms'][95]} / {results['ttft_ms'][99]} ms, "
          f"end-to-end {results['e2e_ms'][50]} / {results['e2e_ms'][95]} / {results['e2e_ms'][99]} ms")
    print_memory(memory)
    path = out / f"soak-{commit}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
