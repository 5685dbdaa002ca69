"""Calibrate a CPU profile's `stack` block on the real local stack (bench/profile_tiny.py --stack).

Starts `elastune up --autoscale` (1 prefill + 1 decode worker, the k8s/local ScaledObjects, as
bench/validate_sim.py runs it) with its own embedded Valkey, then:

1. idle: the CPU the non-worker processes burn with no requests (autoscaler polling, heartbeats);
2. phase "short": requests with 2 output tokens, one at a time (spaced well apart);
3. phase "long": requests with 64 output tokens, one at a time.

The non-worker CPU of both phases, less the idle rate, solves for CPU per request and per output
token (two phases, two unknowns). With one request in flight nothing queues, so
    request_overhead_ms = median(TTFT - profile prefill(prompt) - KV hand-off(prompt))
    step_overhead_ms    = median(time per output token - profile decode step(1, context))
are what the gateway, the gRPC hops, admission and the serving loops add to the model's time.
host_cores is the machine's CPU count: every process of the local stack shares it. When the
stack first serves, each worker's age and CPU time give the cold start (written to the profile's
cold_start_s) and the CPU a starting worker burns (starting_cpu: imports and model load).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import loadgen
from bench.meta import commit, machine
from bench.workloads import Request
from services.common.store import EmbeddedStore
from services.launcher import free_port
from services.sim.profile import profile_from_dict

TICK = os.sysconf("SC_CLK_TCK")
PROMPTS = (16, 48, 128)  # around the validation workload's median of 48
PHASES = {"short": (2, 24, 0.6), "long": (64, 16, 1.6)}  # output tokens, requests, spacing s


def _children(root: int) -> list[int]:
    """Every live descendant of `root` (from /proc: ppid is field 4 of stat)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        kids = [p for p, pp in parent.items() if pp == pid]
        found += kids
        frontier += kids
    return found


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def _age_s(pid: int) -> float:
    """Seconds since the process started (stat field 22, in ticks after boot)."""
    start = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]) / TICK
    boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime"))
    return time.time() - boot - start


def worker_starts() -> list[dict]:
    """Each worker's start, read the moment the stack first serves: wall seconds since its process
    began (an upper bound on its cold start) and the CPU it burnt meanwhile."""
    out = []
    for pid in _children(os.getpid()):
        if _is_worker(pid):
            out.append({"wall_s": _age_s(pid), "cpu_s": _cpu_s(pid)})
    return out


def _is_worker(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return " serve prefill" in cmd or " serve decode" in cmd


def cpu_split() -> tuple[float, float]:
    """(non-worker CPU s, worker CPU s) so far: this process and everything it started."""
    other, worker = time.process_time(), 0.0
    for pid in _children(os.getpid()):
        if _is_worker(pid):
            worker += _cpu_s(pid)
        else:
            other += _cpu_s(pid)
    return other, worker


async def _phase(base_url: str, model: str, output: int, count: int, spacing: float, vocab: int):
    requests = [Request(i * spacing, PROMPTS[i % len(PROMPTS)], output) for i in range(count)]
    before, wall = cpu_split(), time.perf_counter()
    records = await loadgen.run(base_url, model, requests, vocab_size=vocab, seed=output)
    after, wall = cpu_split(), time.perf_counter() - wall
    bad = [r for r in records if not r.ok]
    if bad:
        raise RuntimeError(f"{len(bad)} calibration requests failed: {bad[0].status} {bad[0].error}")
    return records, after[0] - before[0], after[1] - before[1], wall


async def measure(base_url: str, proc: subprocess.Popen, profile, vocab: int, idle_s: float = 8.0) -> dict:
    await loadgen.wait_serving(base_url, proc, 240.0)
    starts = worker_starts()
    model = await loadgen.discover_model(base_url)
    await _phase(base_url, model, 8, 6, 0.5, vocab)  # warm-up: first requests pay lazy set-up
    before, wall = cpu_split(), time.perf_counter()
    await asyncio.sleep(idle_s)
    idle_cores = (cpu_split()[0] - before[0]) / (time.perf_counter() - wall)
    runs = {name: await _phase(base_url, model, *spec, vocab) for name, spec in PHASES.items()}
    # other CPU - idle * wall = per_request * n + per_token * tokens, for both phases
    rows = []
    for records, other, _, wall in runs.values():
        rows.append((len(records), sum(r.tokens_received for r in records), max(other - idle_cores * wall, 0.0)))
    (n1, k1, c1), (n2, k2, c2) = rows
    per_token = max((c2 * n1 - c1 * n2) / (k2 * n1 - k1 * n2), 0.0)
    per_request = max((c1 - per_token * k1) / n1, 0.0)
    kv = profile.kv_transfer_ms_per_token
    ttft_extra, step_extra = [], []
    for records, *_ in runs.values():
        for r in records:
            ttft_extra.append(r.ttft_s * 1000 - profile.prefill.batch_ms(r.prompt_tokens, r.prompt_tokens**2, 1, 1.0)
                              - kv * r.prompt_tokens)
            if r.tokens_received > 8:
                tpot = (r.e2e_s - r.ttft_s) / (r.tokens_received - 1) * 1000
                step_extra.append(tpot - profile.decode.step_ms(1, r.prompt_tokens + r.tokens_received / 2, 1.0))
    worker_cpu = {name: worker / wall for name, (_, _, worker, wall) in runs.items()}
    start_wall = statistics.mean(w["wall_s"] for w in starts)
    return {
        "starting_cpu": min(sum(w["cpu_s"] for w in starts) / sum(w["wall_s"] for w in starts), 1.0),
        "cold_start_s": start_wall,
        "host_cores": os.cpu_count() or 1,
        "request_overhead_ms": max(statistics.median(ttft_extra), 0.0),
        "step_overhead_ms": max(statistics.median(step_extra), 0.0),
        "background_cores": idle_cores,
        "cpu_ms_per_request": per_request * 1000,
        "cpu_ms_per_token": per_token * 1000,
        "measured": {
            "ttft_extra_ms": {"median": statistics.median(ttft_extra), "min": min(ttft_extra), "max": max(ttft_extra)},
            "step_extra_ms": {"median": statistics.median(step_extra), "min": min(step_extra), "max": max(step_extra)},
            "phases": {name: {"requests": n, "tokens": k, "other_cpu_s_less_idle": c}
                       for name, (n, k, c) in zip(PHASES, rows)},
            "worker_cores": worker_cpu,
            "worker_starts": starts,
            "loadavg_1m": os.getloadavg()[0],
        },
    }


def calibrate(path: Path, vocab: int = 4096) -> dict:
    data = json.loads(path.read_text())
    profile = profile_from_dict({k: v for k, v in data.items() if k != "stack"})
    store = EmbeddedStore()
    url = store.start()
    port = free_port()
    cmd = [sys.executable, "-m", "services.cli", "up", "--port", str(port), "--prefill", "1", "--decode", "1",
           "--autoscale", "--scaledobjects", "k8s/local", "--events", os.devnull]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "REDIS_URL": url})
    try:
        stack = asyncio.run(measure(f"http://127.0.0.1:{port}", proc, profile, vocab))
    finally:
        proc.send_signal(2)  # SIGINT: elastune up stops its whole tree
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        store.stop()
    stack["source"] = (f"measured: bench/profile_tiny.py --stack on {machine()['host']} ({machine()['cpus']} CPUs), "
                       f"commit {commit()}")
    # the workers' measured start (process launch -> the stack serves) is the profile's cold start
    cold = stack.pop("cold_start_s")
    data["cold_start_s"] = {"prefill": round(cold, 1), "decode": round(cold, 1)}
    data["stack"] = stack
    path.write_text(json.dumps(data, indent=2) + "\n")
    m = stack["measured"]
    print(f"request overhead {stack['request_overhead_ms']:.1f} ms (TTFT - model prefill; min "
          f"{m['ttft_extra_ms']['min']:.1f}, max {m['ttft_extra_ms']['max']:.1f})")
    print(f"step overhead {stack['step_overhead_ms']:.2f} ms (TPOT - model step; min {m['step_extra_ms']['min']:.2f}, "
          f"max {m['step_extra_ms']['max']:.2f})")
    print(f"host: {stack['host_cores']} cores; background {stack['background_cores']:.3f} cores idle + "
          f"{stack['cpu_ms_per_request']:.1f} ms CPU/request + {stack['cpu_ms_per_token']:.3f} ms CPU/output token")
    print(f"worker start {cold:.1f} s (cold_start_s), burning {stack['starting_cpu']:.2f} cores while it starts")
    print(f"worker cores busy: {m['worker_cores']}; load average {m['loadavg_1m']:.2f}")
    print(f"wrote the stack block of {path}")
    return stack
