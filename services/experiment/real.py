"""Real mode: one run on the local stack (`elastune up --autoscale`) driven by the open-loop load client.

The run starts its own embedded Valkey and hands it to `elastune up` (REDIS_URL), so it can watch
the workers the autoscaler starts and stops: every `real.sample_s` it records each stage's ready,
draining and asked replicas and the gateway's load report. The load client (bench/loadgen.py)
sends the workload on schedule over the OpenAI HTTP API with streaming; its per-request records
become the RunData. Scaling events come from the autoscaler's JSON-lines event file.

Elastic runs scale as the ScaledObjects in `real.scaledobjects` say (the run name's policy
variants are simulator-only); static runs serve with 1 prefill + 1 decode worker and no
autoscaling (the machine has two cores). Each worker process counts as one "GPU" with share 1
in the GPU-second figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import loadgen
from bench.workloads import Request
from services.common import keys
from services.common.registry import WorkerDirectory
from services.common.store import EmbeddedStore, connect
from services.launcher import free_port
from services.sim.result import RunData, ScaleChange, StageSample

from .config import ExperimentConfig

STAGES = ("prefill", "decode")
READY_TIMEOUT_S = 240.0
STATIC_RUNS = ("static_peak", "static_peak_tuned", "static_mean")


def _command(cfg: ExperimentConfig, run: str, port: int, events: Path) -> list[str]:
    cmd = [sys.executable, "-m", "services.cli", "up", "--port", str(port), "--prefill", "1", "--decode", "1"]
    if cfg.real.model:
        cmd += ["--model", cfg.real.model]
    if run not in STATIC_RUNS:
        cmd += ["--autoscale", "--scaledobjects", cfg.real.scaledobjects, "--events", str(events)]
    return cmd


async def _sample(store_url: str, t0: float, every_s: float, out: list[StageSample], stop: asyncio.Event) -> None:
    store = connect(store_url)
    directory = WorkerDirectory(store, keys.DEFAULT_PREFIX)
    try:
        while not stop.is_set():
            now = time.time() - t0
            gateways = await directory.workers("gateway")
            for stage in STAGES:
                workers = await directory.workers(stage)
                ready = sum(not w.draining for w in workers)
                draining = len(workers) - ready
                asked_raw = await store.get(keys.asked_replicas(keys.DEFAULT_PREFIX, stage))
                asked = int(asked_raw) if asked_raw else ready
                rate = sum(g.prompt_tokens_per_s if stage == "prefill" else g.output_tokens_per_s for g in gateways)
                queue = sum(g.queue_len for g in gateways)
                out.append(StageSample(now, stage, ready, max(asked - ready, 0), 0, draining, asked,
                                       float(ready + draining + max(asked - ready, 0)), rate, queue))
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except asyncio.TimeoutError:
                pass
    finally:
        await store.aclose()


def _to_rundata(records: list[loadgen.Record], samples: list[StageSample], changes: list[ScaleChange],
                duration_s: float, every_s: float) -> RunData:
    d = RunData()
    for r in records:
        d.arrival_s.append(r.scheduled_s)
        d.prompt_tokens.append(r.prompt_tokens)
        d.output_tokens.append(r.max_tokens)
        d.status.append("ok" if r.ok else f"error: {r.status} {r.error[:80]}")
        d.ttft_s.append(r.ttft_s if r.ok else None)
        d.e2e_s.append(r.e2e_s if r.ok else None)
        n = r.tokens_received
        d.tpot_s.append(((r.e2e_s - r.ttft_s) / (n - 1) if n > 1 else 0.0) if r.ok and r.ttft_s is not None else None)
        d.queue_s.append(r.hdr_decode_queue_ms / 1000 if r.hdr_decode_queue_ms is not None else None)
        d.prefill_s.append(r.hdr_prefill_ms / 1000 if r.hdr_prefill_ms is not None else None)
        d.itl_values.extend(r.gaps_s)
        d.itl_weights.extend([1.0] * len(r.gaps_s))
    d.timeline, d.changes, d.duration_s = samples, changes, duration_s
    # One CPU worker process = one unit of share; integrate the samples as a step function.
    by_time: dict[float, float] = {}
    for s in samples:
        by_time[s.time] = by_time.get(s.time, 0.0) + s.share
    times = sorted(by_time)
    d.share_seconds = sum(by_time[t] * (b - t) for t, b in zip(times, times[1:] + [duration_s]) if b > t)
    d.gpu_seconds_occupied = d.share_seconds
    return d


def _read_changes(path: Path, t0: float) -> list[ScaleChange]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            e = json.loads(line)
            out.append(ScaleChange(e["time"] - t0, e["stage"], int(e["from"]), int(e["to"])))
    return out


def run_real(cfg: ExperimentConfig, run: str, requests: list[Request], folder: Path,
             echo: Callable[[str], None] = print) -> RunData:
    """Start the stack, replay the workload against it, stop the stack; returns the run's RunData."""
    folder.mkdir(parents=True, exist_ok=True)
    store = EmbeddedStore()
    store_url = store.start()
    port = cfg.real.port or free_port()
    events = folder / "events.jsonl"
    log = open(folder / "stack.log", "w")
    env = {**os.environ, "REDIS_URL": store_url}
    target = base_url = f"http://127.0.0.1:{port}"
    if cfg.real.api == "grpc":  # only the gateway reads ELASTUNE_GRPC_PORT (workers read ELASTUNE_PORT)
        grpc_port = free_port()
        env["ELASTUNE_GRPC_PORT"] = str(grpc_port)
        target = f"127.0.0.1:{grpc_port}"
    proc = subprocess.Popen(_command(cfg, run, port, events), stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        asyncio.run(loadgen.wait_serving(base_url, proc, READY_TIMEOUT_S))
        echo(f"  {run}: stack serving at {base_url}; sending {len(requests)} requests over {cfg.real.api} to {target}")
        records, samples, t0, end = asyncio.run(_drive(cfg, base_url, target, requests, store_url))
        changes = _read_changes(events, t0)
    finally:
        proc.send_signal(signal.SIGINT)  # elastune up stops its whole tree on SIGINT
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        store.stop()
    return _to_rundata(records, samples, changes, end, cfg.real.sample_s)


async def _drive(cfg: ExperimentConfig, base_url: str, target: str, requests: list[Request], store_url: str):
    model = await loadgen.discover_model(base_url)
    samples: list[StageSample] = []
    stop = asyncio.Event()
    t0 = time.time()
    sampler = asyncio.create_task(_sample(store_url, t0, cfg.real.sample_s, samples, stop), name="experiment.sample")
    try:
        records = await loadgen.run(target, model, requests, vocab_size=cfg.real.vocab, seed=cfg.seed,
                                    api=cfg.real.api)
    finally:
        stop.set()
        await sampler
    return records, samples, t0, time.time() - t0
