"""Open-loop load client: the OpenAI-compatible completions endpoint with streaming (HTTP), or
the gateway's gRPC `Gateway.Generate` server stream (`--api grpc`).

Each request is sent at its scheduled arrival time whatever the server is doing (one asyncio
task per request, started by a scheduler that sleeps until each arrival), so a slow server
shows up as latency, never as a lower offered load. Client lag (send time minus scheduled
time) is recorded so an overloaded client never masquerades as a slow server.

    python bench/loadgen.py --url http://127.0.0.1:8000 --workload poisson --rate 4 \
        --duration 30 --seed 0 --out results.csv
    python bench/loadgen.py --api grpc --url 127.0.0.1:50051 --workload gamma --rate 4 --cv 3

Records are written as CSV (pyarrow, hence Parquet, is not a project dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import aiohttp
import grpc
import numpy as np

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not bench/ (bench/profile.py: stdlib profile)

from bench import workloads  # noqa: E402
from bench.workloads import Request  # noqa: E402
from services.proto import inference_pb2 as pb  # noqa: E402
from services.proto import inference_pb2_grpc as pb_grpc  # noqa: E402

SERVER_HEADERS = {
    "X-Elastune-TTFT-Ms": "hdr_ttft_ms",
    "X-Elastune-Prefill-Ms": "hdr_prefill_ms",
    "X-Elastune-KV-Transfer-Ms": "hdr_kv_transfer_ms",
    "X-Elastune-Decode-Queue-Ms": "hdr_decode_queue_ms",
}

# gRPC status -> the HTTP status the gateway's HTTP API answers for the same outcome (the
# usual google.rpc mapping), so both APIs' records summarise alike; the code name is kept too.
GRPC_TO_HTTP = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


@dataclass
class Record:
    """One request's outcome; times in seconds from the start of the run."""

    index: int
    scheduled_s: float
    sent_s: float = 0.0
    prompt_tokens: int = 0
    max_tokens: int = 0
    status: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    tokens_received: int = 0
    gaps_s: list[float] = field(default_factory=list)
    error: str = ""
    hdr_ttft_ms: float | None = None
    hdr_prefill_ms: float | None = None
    hdr_kv_transfer_ms: float | None = None
    hdr_decode_queue_ms: float | None = None
    grpc_code: str = ""  # gRPC runs: the status code's name ("OK", "RESOURCE_EXHAUSTED", ...)

    @property
    def lag_s(self) -> float:  # client lag: actual send minus scheduled send
        return self.sent_s - self.scheduled_s

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error


def prompt_ids(index: int, length: int, vocab_size: int, seed: int) -> list[int]:
    """Deterministic token ids in [5, vocab_size) for request `index`."""
    rng = np.random.default_rng([seed, index])
    return rng.integers(5, vocab_size, size=length).tolist()


def _count_tokens(record: Record, n: int, now: float, last: float | None) -> float:
    """Account `n` tokens that arrived together at `now`; a burst's gap is spread evenly."""
    if last is None:
        record.ttft_s = now - record.sent_s
        record.gaps_s.extend([0.0] * (n - 1))
    else:
        record.gaps_s.extend([(now - last) / n] * n)
    record.tokens_received += n
    return now


async def _send_http(
    session: aiohttp.ClientSession, url: str, body: dict, record: Record, clock, t0: float
) -> None:
    record.sent_s = clock() - t0
    last = None
    try:
        async with session.post(url, json=body) as resp:
            record.status = resp.status
            for header, name in SERVER_HEADERS.items():
                if header in resp.headers:
                    setattr(record, name, float(resp.headers[header]))
            if resp.status != 200:
                record.error = (await resp.text())[:500]
                return
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("error"):
                    record.error = str(event["error"])[:500]
                    break
                for header, value in (event.get("elastune_timings") or {}).items():  # the usage event
                    if header in SERVER_HEADERS:
                        setattr(record, SERVER_HEADERS[header], float(value))
                n = 0
                for choice in event.get("choices") or []:
                    ids = choice.get("token_ids")
                    n += len(ids) if ids is not None else (1 if choice.get("text") else 0)
                if n:
                    last = _count_tokens(record, n, clock() - t0, last)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, none retried
        record.error = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        record.e2e_s = clock() - t0 - record.sent_s


async def _send_grpc(
    stub: pb_grpc.GatewayStub, request: pb.GenerateRequest, record: Record, clock, t0: float, timeout_s: float
) -> None:
    record.sent_s = clock() - t0
    last = None
    try:
        async for msg in stub.Generate(request, timeout=timeout_s):
            if msg.HasField("timings"):  # the last message: the stage timings the HTTP API sends as headers
                t = msg.timings
                record.hdr_prefill_ms = t.prefill_queue_ms + t.prefill_compute_ms
                record.hdr_kv_transfer_ms = t.kv_transfer_ms
                record.hdr_decode_queue_ms = t.decode_queue_ms
            if msg.token_ids:
                last = _count_tokens(record, len(msg.token_ids), clock() - t0, last)
        record.status, record.grpc_code = 200, grpc.StatusCode.OK.name
    except grpc.aio.AioRpcError as exc:
        record.grpc_code = exc.code().name
        record.status = GRPC_TO_HTTP.get(exc.code(), 500)
        record.error = f"{exc.code().name}: {exc.details()}"[:500]
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, none retried
        record.error = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        record.e2e_s = clock() - t0 - record.sent_s


async def _open_loop(requests: list[Request], send) -> None:
    """Start send(i, request) at each request's arrival time, whatever earlier ones are doing."""
    clock = asyncio.get_running_loop().time
    tasks = []
    t0 = clock()
    for i, req in enumerate(requests):
        delay = t0 + req.arrival_s - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(i, req, t0), name=f"loadgen.request-{i}"))
    await asyncio.gather(*tasks)


async def run(
    base_url: str,
    model: str,
    requests: list[Request],
    *,
    vocab_size: int = 32000,
    seed: int = 0,
    text_prompts: bool = False,
    timeout_s: float = 600.0,
    api: str = "http",
) -> list[Record]:
    """Send every request at its arrival time (open loop); return one Record per request.

    api "http": `base_url` is the gateway's HTTP root; "grpc": its gRPC address host:port."""
    if api not in ("http", "grpc"):
        raise ValueError(f"api must be 'http' or 'grpc', got {api!r}")
    clock = asyncio.get_running_loop().time
    records = [Record(i, r.arrival_s, prompt_tokens=r.prompt_tokens, max_tokens=r.output_tokens)
               for i, r in enumerate(requests)]

    def prompt(i: int, req: Request) -> list[int] | str:
        return "hi " * req.prompt_tokens if text_prompts else prompt_ids(i, req.prompt_tokens, vocab_size, seed)

    if api == "grpc":
        # One channel: every request is its own HTTP/2 stream on it, as a gRPC client would do.
        async with grpc.aio.insecure_channel(base_url.removeprefix("grpc://")) as channel:
            stub = pb_grpc.GatewayStub(channel)

            async def send_grpc(i: int, req: Request, t0: float) -> None:
                body = pb.GenerateRequest(model=model, sampling=pb.SamplingParams(
                    max_tokens=req.output_tokens, ignore_eos=True))
                text_or_ids = prompt(i, req)
                if isinstance(text_or_ids, str):
                    body.prompt = text_or_ids
                else:
                    body.prompt_token_ids.extend(text_or_ids)
                await _send_grpc(stub, body, records[i], clock, t0, timeout_s)

            await _open_loop(requests, send_grpc)
        return records

    url = base_url.rstrip("/") + "/v1/completions"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

        async def send_http(i: int, req: Request, t0: float) -> None:
            body = {"model": model, "prompt": prompt(i, req), "max_tokens": req.output_tokens,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                    "return_token_ids": True}
            await _send_http(session, url, body, records[i], clock, t0)

        await _open_loop(requests, send_http)
    return records


def _pct(values: list[float], q: float, scale: float = 1000.0) -> float | None:
    return float(np.percentile(values, q)) * scale if values else None


def summarize(records: list[Record]) -> dict:
    """Latency percentiles (ms), throughput, status counts and client lag (ms)."""
    ok = [r for r in records if r.ok]
    result: dict = {"requests": len(records), "completed": len(ok)}
    series = {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "itl": [g for r in ok for g in r.gaps_s],
        "e2e": [r.e2e_s for r in ok if r.e2e_s is not None],
    }
    for name, values in series.items():
        for q in (50, 95, 99):
            result[f"{name}_p{q}_ms"] = _pct(values, q)
    ends = [r.sent_s + (r.e2e_s or 0.0) for r in records]
    span = max(ends) - min(r.sent_s for r in records) if records else 0.0
    tokens = sum(r.tokens_received for r in ok)
    result["tokens_per_s"] = tokens / span if span > 0 else 0.0
    result["requests_per_s"] = len(ok) / span if span > 0 else 0.0
    result["status_counts"] = dict(Counter(r.status for r in records))
    result["errors"] = sum(1 for r in records if r.error)
    lags = [r.lag_s for r in records]
    result["lag_p50_ms"] = _pct(lags, 50)
    result["lag_p99_ms"] = _pct(lags, 99)
    result["lag_max_ms"] = max(lags) * 1000.0 if lags else None
    return result


def write_csv(records: list[Record], path: str | Path) -> None:
    """One row per request; inter-token gaps as a ;-joined string of seconds."""
    names = [f.name for f in fields(Record)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for r in records:
            row = {n: getattr(r, n) for n in names}
            row["gaps_s"] = ";".join(f"{g:.6f}" for g in r.gaps_s)
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def read_csv(path: str | Path) -> list[Record]:
    """Records written by write_csv."""
    kinds = {f.name: str(f.type) for f in fields(Record)}
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            values: dict = {"gaps_s": [float(g) for g in row.pop("gaps_s").split(";") if g]}
            for name, text in row.items():
                if kinds[name] == "str":
                    values[name] = text
                    continue
                parse = int if kinds[name] == "int" else float
                values[name] = None if text == "" else parse(text)
            out.append(Record(**values))
    return out


async def discover_model(base_url: str, fallback: str = "tiny") -> str:
    """The first model id the server lists at /v1/models, else `fallback`."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(base_url.rstrip("/") + "/v1/models") as resp:
                data = (await resp.json())["data"]
                return str(data[0]["id"]) if data else fallback
    except Exception:  # noqa: BLE001 - any failure falls back to the given id
        return fallback


async def wait_serving(base_url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Wait until the stack `proc` started (elastune up) answers /v1/models at base_url."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"elastune up exited with code {proc.returncode} before serving")
            try:
                async with session.get(base_url.rstrip("/") + "/v1/models") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(1.0)
    raise TimeoutError(f"elastune up did not serve {base_url} within {timeout_s:.0f} s")


def build_workload(args: argparse.Namespace) -> list[Request]:
    lengths = {
        "prompt_frac_long": args.frac_long, "prompt_short_median": args.short_median,
        "prompt_long_median": args.long_median, "prompt_max_tokens": args.max_prompt,
        "output_median": args.output_median, "output_max_tokens": args.max_output,
    }
    if args.workload == "poisson":
        reqs = workloads.poisson(args.rate, args.duration, args.seed, **lengths)
    elif args.workload == "gamma":
        reqs = workloads.gamma(args.rate, args.cv, args.duration, args.seed, **lengths)
    elif args.workload == "onoff":
        reqs = workloads.onoff(args.rate, args.mean_on, args.mean_off, args.duration, args.seed, **lengths)
    elif args.workload == "mmpp":
        rates = [float(x) for x in args.mmpp_rates.split(",")]
        k = len(rates)
        switch = [[0.0 if i == j else args.mmpp_switch / (k - 1) for j in range(k)] for i in range(k)]
        reqs = workloads.mmpp(rates, switch, args.duration, args.seed, **lengths)
    else:
        path = args.trace or str(_shared_dir() / "traces" / (
            "azure_conv_2023.csv" if args.workload == "azure" else "mooncake_synthetic.jsonl"))
        reqs = workloads.load_trace(path)
        reqs = workloads.window(reqs, args.start, args.duration * args.rate_scale)
        reqs = workloads.scale_rate(reqs, args.rate_scale)
    if args.max_context:  # every workload: prompt + output must fit the model's window
        reqs = workloads.scale_lengths(reqs, args.max_context, args.max_output)
    return reqs


def _shared_dir() -> Path:
    return Path(os.environ.get("ELASTUNE_SHARED") or Path(__file__).resolve().parents[2] / "shared")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="HTTP root, or host:port with --api grpc")
    p.add_argument("--api", choices=["http", "grpc"], default="http",
                   help="OpenAI HTTP streaming, or the gateway's gRPC Generate stream")
    p.add_argument("--model", default="", help="model id (default: first of GET /v1/models)")
    p.add_argument("--workload", choices=["poisson", "gamma", "onoff", "mmpp", "azure", "mooncake"],
                   default="poisson")
    numeric: list[tuple[str, type, float, str]] = [  # flag, type, default, help
        ("--rate", float, 4.0, "req/s (on-rate for onoff)"), ("--duration", float, 30.0, "seconds"),
        ("--seed", int, 0, "seed"), ("--cv", float, 2.0, "gamma inter-arrival CV"),
        ("--mean-on", float, 5.0, "onoff burst s"), ("--mean-off", float, 10.0, "onoff idle s"),
        ("--mmpp-switch", float, 0.1, "mmpp state leave rate"), ("--frac-long", float, 0.2, "long share"),
        ("--short-median", float, 256, "tokens"), ("--long-median", float, 2048, "tokens"),
        ("--max-prompt", int, 4096, "prompt clip"), ("--output-median", float, 128, "tokens"),
        ("--max-output", int, 1024, "output clip"),
    ]
    for flag, kind, default, text in numeric:
        p.add_argument(flag, type=kind, default=default, help=text)
    p.add_argument("--mmpp-rates", default="1,8", help="mmpp: comma-separated per-state rates")
    p.add_argument("--trace", default="", help="trace file for azure/mooncake (default: shared)")
    p.add_argument("--start", type=float, default=0.0, help="trace window start (trace seconds)")
    p.add_argument("--rate-scale", type=float, default=1.0, help="trace replay speed-up")
    p.add_argument("--max-context", type=int, default=0, help="scale trace lengths to fit")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--text", action="store_true", help="send text prompts instead of token ids")
    p.add_argument("--out", default="")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    reqs = build_workload(args)
    # gRPC: an empty model is the gateway's own (it checks only a model that is named)
    model = args.model or ("" if args.api == "grpc" else asyncio.run(discover_model(args.url)))
    print("workload:", json.dumps(workloads.summary(reqs)))
    records = asyncio.run(run(args.url, model, reqs, vocab_size=args.vocab,
                              seed=args.seed, text_prompts=args.text, api=args.api))
    if args.out:
        write_csv(records, args.out)
    for key, value in summarize(records).items():
        shown = f"{value:.2f}" if isinstance(value, float) else value
        print(f"{key:>18}  {shown}")


if __name__ == "__main__":
    main()
