"""Pipeline benchmark: HTTP streaming through `elastune up` vs sequential transformers generate().

Starts the stack as separate processes (store, prefill, decode, gateway), then measures
output tokens/s and TTFT / inter-token latency p50/p95/p99 at several concurrencies
(closed loop), the gateway's TTFT overhead against calling the decode worker directly over
gRPC, and `transformers` generate() on the same prompts, one after another, in the same run.
Seeded; prints a table and writes JSON with machine, device and commit.

    python bench/pipeline.py [--model DIR] [--requests-per-stream 8] [--max-tokens 64] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import aiohttp
import grpc

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/: bench/profile.py must not shadow stdlib profile

from services.common.registry import WorkerDirectory  # noqa: E402
from services.common.store import connect  # noqa: E402
from services.engine.tiny import ensure_tiny_model  # noqa: E402
from services.launcher import Stack, UpOptions, free_port  # noqa: E402
from bench.meta import commit, machine, write_json  # noqa: E402
from services.proto import inference_pb2 as pb  # noqa: E402
from services.proto import inference_pb2_grpc as pb_grpc  # noqa: E402

MODEL_NAME = "tiny"  # the served model id: the model directory's name, set in main()
WORDS = "token prefill decode batch cache stream gateway worker scale queue latency budget".split()


def make_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 120))) for _ in range(n)]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def http_stream(session: aiohttp.ClientSession, base: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with session.post(base + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            n = len(json.loads(line[6:])["choices"][0]["token_ids"])
            if n:
                stamps.append(time.perf_counter())
                tokens += n
    return {"ttft": stamps[0] - start, "gaps": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens,
            "e2e": time.perf_counter() - start}


async def closed_loop(base: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    queue = list(prompts)
    results = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await http_stream(session, base, prompts[0], 4)  # warm-up

        async def client():
            while queue:
                results.append(await http_stream(session, base, queue.pop(), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttft = [r["ttft"] * 1000 for r in results]
    itl = [g * 1000 for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency, "requests": len(results), "output_tokens": tokens, "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_ms": {"p50": pct(ttft, 50), "p95": pct(ttft, 95), "p99": pct(ttft, 99)},
        "itl_ms": {"p50": pct(itl, 50), "p95": pct(itl, 95), "p99": pct(itl, 99)},
    }


async def ttft_direct_vs_gateway(base: str, store_url: str, token_prompts: list[list[int]], text_prompts: list[str]) -> dict:
    """p50 TTFT at concurrency 1: decode worker over gRPC (with the same prefill worker) vs the gateway."""
    store = connect(store_url)
    directory = WorkerDirectory(store, "elastune")
    decode = (await directory.workers("decode"))[0]
    prefill = (await directory.workers("prefill"))[0]
    await store.aclose()
    direct, via_gateway = [], []
    async with grpc.aio.insecure_channel(decode.address) as channel:
        stub = pb_grpc.DecodeStub(channel)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            for ids, text in zip(token_prompts, text_prompts):
                start = time.perf_counter()
                call = stub.Generate(pb.DecodeRequest(
                    request_id="bench", prompt_token_ids=ids, prefill_address=prefill.address,
                    prefill_host_id=prefill.host_id, sampling=pb.SamplingParams(max_tokens=1, temperature=0)))
                async for _ in call:
                    direct.append((time.perf_counter() - start) * 1000)
                    break
                call.cancel()
                via_gateway.append((await http_stream(session, base, text, 1))["ttft"] * 1000)
    return {"direct_p50_ms": pct(direct, 50), "gateway_p50_ms": pct(via_gateway, 50),
            "overhead_p50_ms": pct(via_gateway, 50) - pct(direct, 50)}


def transformers_baseline(model_dir: str, prompts: list[str], max_tokens: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generate(torch.tensor([tok.encode(prompts[0])]), max_new_tokens=4, do_sample=False)  # warm-up
    tokens = 0
    start = time.perf_counter()
    for p in prompts:
        ids = torch.tensor([tok.encode(p)])
        out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - start
    return {"requests": len(prompts), "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="")
    ap.add_argument("--requests-per-stream", type=int, default=8, help="requests per client at each concurrency")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    model_dir = args.model or str(ensure_tiny_model())
    global MODEL_NAME
    MODEL_NAME = Path(model_dir).name
    levels = [int(x) for x in args.concurrency.split(",")]
    prompts = make_prompts(max(16, args.requests_per_stream * max(levels)), args.seed)
    port = free_port()
    stack = Stack(UpOptions(model=model_dir, port=port, prefill=1, decode=1))
    results: dict = {"machine": machine(),
                     "device": "cpu", "commit": commit(), "model": model_dir, "max_tokens": args.max_tokens,
                     "seed": args.seed, "pipeline": []}
    try:
        stack.start()
        stack.wait_ready()
        base = stack.base_url
        for c in levels:
            n = max(16, args.requests_per_stream * c)  # long enough to reach a steady batch
            results["pipeline"].append(asyncio.run(closed_loop(base, prompts[:n], c, args.max_tokens)))
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        sample = prompts[:64]
        results["gateway_overhead"] = asyncio.run(
            ttft_direct_vs_gateway(base, stack.store_url, [tok.encode(p) for p in sample], sample))
    finally:
        stack.stop()
    # One torch thread: on the 2-core machine two threads make this tiny model 3x slower.
    results["transformers_sequential"] = transformers_baseline(model_dir, prompts[:16], args.max_tokens, 1)

    print(f"\nelastune pipeline, tiny model, {args.max_tokens} output tokens per request, commit {results['commit']}")
    print(f"{'conc':>5} {'reqs':>5} {'tok/s':>8} {'TTFT p50':>9} {'p95':>7} {'p99':>7} {'ITL p50':>8} {'p95':>6} {'p99':>6}  (ms)")
    for r in results["pipeline"]:
        t, i = r["ttft_ms"], r["itl_ms"]
        print(f"{r['concurrency']:>5} {r['requests']:>5} {r['tokens_per_s']:>8.0f} {t['p50']:>9.1f} {t['p95']:>7.1f} "
              f"{t['p99']:>7.1f} {i['p50']:>8.1f} {i['p95']:>6.1f} {i['p99']:>6.1f}")
    hf = results["transformers_sequential"]
    print(f"transformers generate(), sequential: {hf['tokens_per_s']:.0f} tok/s")
    g = results["gateway_overhead"]
    print(f"TTFT p50 direct to decode {g['direct_p50_ms']:.2f} ms, through the gateway {g['gateway_p50_ms']:.2f} ms "
          f"(+{g['overhead_p50_ms']:.2f} ms)")
    write_json(Path(args.out) / f"pipeline-{results['commit']}.json", results)



if __name__ == "__main__":
    main()
