"""`elastune profile`: latency and throughput per stage over shares x runtime settings.

A curve is one (stage, batch size, workload): throughput as a function of the share. Each
curve runs its own adaptive knee search (knee.KneeSearch); in each round the profiler gathers
the shares the unfinished searches ask for and measures, per share, every item wanted there in
ONE process started at that share (probe.py), since starting a process (and, on a GPU, an MPS
client) is most of the cost of a measurement. After the searches, check rounds make sure that at
each share of the grid the table's best config (and, given the stage SLO, the best within it)
was measured there, not estimated, and so was every config whose estimated p95 lies within
`slo_margin` of the SLO (an estimate cannot decide that close): selection then never rests on
an interpolation for its winner.

The driver is the same for CPU and GPU; only the ShareMechanism differs (threads + affinity,
or CUDA_MPS_ACTIVE_THREAD_PERCENTAGE). Tests drive it with a hand-made `measure`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .knee import KneeSearch
from .probe import Measurement, ProbeItem, ProbeJob
from .shares import ShareMechanism
from .table import ProfilePoint, TuningTable, best_within_slo

REPO = Path(__file__).resolve().parents[2]

# One process per call: (share, items) -> one Measurement per item, same order.
Measure = Callable[[float, Sequence[ProbeItem]], list[Measurement]]


@dataclass(frozen=True)
class ProfileGrid:
    """What to profile. The default is small enough for the tiny model on a 2-core CPU."""

    stages: tuple[str, ...] = ("prefill", "decode")
    prefill_batches: tuple[int, ...] = (1, 2, 4, 8)
    prompt_lens: tuple[int, ...] = (32, 128)
    decode_batches: tuple[int, ...] = (1, 4, 16, 64)
    context_lens: tuple[int, ...] = (64, 256)
    # MoE models: expert micro-batch sizes (routed tokens per expert pass) x Forward call sizes
    # (routed tokens per call); only micro-batches up to the call size (beyond it nothing is cut).
    experts_micro_batches: tuple[int, ...] = (16, 64, 256, 1024)
    experts_call_tokens: tuple[int, ...] = (256, 1024)
    shares: tuple[float, ...] = ()  # empty: every share the mechanism offers (ShareMechanism.grid)
    epsilon: float = 0.05
    slo_prefill_ms: float = 0.0  # the SLOs the sidecars will select under (0: none); see the check round
    slo_decode_ms: float = 0.0
    slo_experts_ms: float = 0.0
    slo_margin: float = 0.1  # estimates this close to an SLO are measured, not trusted

    def slo_ms(self, stage: str) -> float:
        return {"prefill": self.slo_prefill_ms, "decode": self.slo_decode_ms}.get(stage, self.slo_experts_ms)

    def validate(self) -> None:
        for name in ("prefill_batches", "prompt_lens", "decode_batches", "context_lens", "experts_micro_batches",
                     "experts_call_tokens"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(not 0 < s <= 1 for s in self.shares):
            raise ValueError(f"shares must be in (0, 1], got {self.shares}")
        if not self.stages or not set(self.stages) <= {"prefill", "decode", "experts"}:
            raise ValueError(f"stages must be some of prefill, decode, experts, got {self.stages}")
        if "experts" in self.stages and not (self.experts_micro_batches and self.experts_call_tokens):
            raise ValueError("stage experts needs experts_micro_batches and experts_call_tokens")
        if "experts" in self.stages and min(self.experts_micro_batches) > min(self.experts_call_tokens):
            raise ValueError(f"experts_micro_batches {self.experts_micro_batches} has none <= the call size "
                             f"{min(self.experts_call_tokens)}: every experts_call_tokens needs one")

    def items(self) -> list[ProbeItem]:
        out = []
        if "prefill" in self.stages:
            out += [ProbeItem("prefill", {"max_batch_size": b}, {"prompt_len": n})
                    for n in self.prompt_lens for b in self.prefill_batches]
        if "decode" in self.stages:
            out += [ProbeItem("decode", {"max_batch_size": b, "max_concurrency": b}, {"context_len": n})
                    for n in self.context_lens for b in self.decode_batches]
        if "experts" in self.stages:
            out += [ProbeItem("experts", {"max_batch_size": m}, {"call_tokens": n})
                    for n in self.experts_call_tokens for m in self.experts_micro_batches if m <= n]
        return out


def _key(item: ProbeItem) -> str:
    return json.dumps([item.stage, item.config, item.workload], sort_keys=True)


@dataclass
class ProfileResult:
    table: TuningTable
    knees: list[dict] = field(default_factory=list)  # {stage, batch, workload, knee, measured shares}
    measurements: int = 0
    processes: int = 0
    full_grid_measurements: int = 0
    wall_s: float = 0.0

    def report(self) -> dict:
        return {
            "knees": self.knees,
            "cost": {
                "measurements": self.measurements,
                "processes": self.processes,
                "full_grid_measurements": self.full_grid_measurements,
                "wall_s": round(self.wall_s, 3),
            },
        }


def profile(
    grid: ProfileGrid, shares: Sequence[float], measure: Measure, model: str, device: str,
    clock: Callable[[], float] = time.time,
) -> ProfileResult:
    """Run the adaptive profile (see the module docstring) and return the table it measured."""
    grid.validate()
    started = time.monotonic()
    items = grid.items()
    searches = {_key(i): KneeSearch(grid=shares, epsilon=grid.epsilon) for i in items}
    by_key = {_key(i): i for i in items}
    result = ProfileResult(TuningTable(), full_grid_measurements=len(items) * len(shares))
    measured: set[tuple[str, float]] = set()

    def run_round(wanted: dict[float, list[ProbeItem]]) -> None:
        for share in sorted(wanted, reverse=True):
            batch = wanted[share]
            results = measure(share, batch)
            result.processes += 1
            result.measurements += len(batch)
            for item, m in zip(batch, results):
                measured.add((_key(item), share))
                result.table.add(_point(model, device, share, m, clock()))
                search = searches[_key(item)]
                if search.next_share() == share:
                    search.record(share, m.throughput_tokens_per_s)

    while wanted := _group((s.next_share(), by_key[k]) for k, s in searches.items() if not s.done):
        run_round(wanted)
    # Check round(s): the best config at each grid share must be a measurement, not an estimate.
    while wanted := _group(_unmeasured_winners(result.table, grid, model, device, shares, measured)):
        run_round(wanted)
    for k, search in searches.items():
        item = by_key[k]
        result.knees.append({"stage": item.stage, "batch": item.config["max_batch_size"], "workload": item.workload,
                             "knee": search.knee, "measured_shares": sorted(search.measured)})
    result.wall_s = time.monotonic() - started
    return result


def _group(pairs) -> dict[float, list[ProbeItem]]:
    wanted: dict[float, list[ProbeItem]] = {}
    for share, item in pairs:
        if item not in wanted.setdefault(share, []):
            wanted[share].append(item)
    return {s: v for s, v in wanted.items() if v}


def _unmeasured_winners(table: TuningTable, grid: ProfileGrid, model: str, device: str, shares: Sequence[float],
                        measured: set[tuple[str, float]]):
    for m, stage, d in table.groups():
        if (m, d) != (model, device):
            continue
        slo = grid.slo_ms(stage)
        for workload in table.workloads(model, stage, device):
            for share in shares:
                rows = table.points_at(model, stage, device, share, workload)
                if not rows:
                    continue
                check = [max(rows, key=lambda p: (p.throughput_tokens_per_s, -p.batch))]
                if slo > 0:
                    within = best_within_slo(rows, slo)
                    check += [within] if within else []
                    check += [p for p in rows if p.latency_p95_ms is not None
                              and abs(p.latency_p95_ms / slo - 1.0) <= grid.slo_margin]
                for p in check:
                    item = ProbeItem(stage, dict(p.config), dict(p.workload))
                    if (_key(item), share) not in measured:
                        yield share, item


def _point(model: str, device: str, share: float, m: Measurement, now: float) -> ProfilePoint:
    return ProfilePoint(
        model=model, stage=m.item.stage, device=device, share=share, config=dict(m.item.config),
        throughput_tokens_per_s=m.throughput_tokens_per_s, latency_p50_ms=m.latency_p50_ms,
        latency_p95_ms=m.latency_p95_ms, samples=m.samples, source="profile", updated_at=now,
        workload=dict(m.item.workload),
    )


class SubprocessProbe:
    """The real Measure: one `python -m services.tuner.probe` process per call, started with
    the share's environment (and pinned to the share's cores on CPU)."""

    def __init__(self, model_dir: str, device: str, dtype: str, mechanism: ShareMechanism,
                 warmup: int = 1, reps: int = 5, timeout_s: float = 600.0):
        self.model_dir, self.device, self.dtype = model_dir, device, dtype
        self.mechanism = mechanism
        self.warmup, self.reps, self.timeout_s = warmup, reps, timeout_s

    def __call__(self, share: float, items: Sequence[ProbeItem]) -> list[Measurement]:
        job = ProbeJob(self.model_dir, self.device, self.dtype, share, self.mechanism.kind,
                       self.mechanism.cores, tuple(items), self.warmup, self.reps)
        env = {**os.environ, **self.mechanism.child_env(share), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run([sys.executable, "-m", "services.tuner.probe"], input=job.to_json(), env=env,
                              capture_output=True, text=True, timeout=self.timeout_s, cwd=os.getcwd())
        if proc.returncode != 0:
            raise RuntimeError(f"probe at share {share} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        out = []
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                data = json.loads(line)
                data["item"] = ProbeItem(**data["item"])
                out.append(Measurement(**data))
        if len(out) != len(items):
            raise RuntimeError(f"probe at share {share} measured {len(out)} of {len(items)} items")
        return out


def device_kind(device: str) -> str:
    """The table's device key: "cpu", or the GPU's name (e.g. "NVIDIA H100 80GB HBM3")."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return torch.cuda.get_device_name(index)


def format_report(result: ProfileResult) -> str:
    lines = [f"{'stage':8} {'workload':18} {'batch':>5} {'knee':>6}  measured shares"]
    for k in sorted(result.knees, key=lambda k: (k["stage"], sorted(k["workload"].items()), k["batch"])):
        workload = ",".join(f"{a}={b}" for a, b in k["workload"].items())
        lines.append(f"{k['stage']:8} {workload:18} {k['batch']:>5} {k['knee']:>6.2f}  {k['measured_shares']}")
    lines.append("")
    lines.append(f"{'stage':8} {'workload':18} {'share':>5} {'config':34} {'tok/s':>10} {'p50 ms':>8} {'p95 ms':>8}")
    for p in result.table.all_points():
        workload = ",".join(f"{a}={b}" for a, b in p.workload.items())
        config = ",".join(f"{a}={b}" for a, b in p.config.items())
        lines.append(f"{p.stage:8} {workload:18} {p.share:>5.2f} {config:34} {p.throughput_tokens_per_s:>10.1f} "
                     f"{p.latency_p50_ms or 0:>8.2f} {p.latency_p95_ms or 0:>8.2f}")
    r = result.report()["cost"]
    lines.append("")
    lines.append(f"cost: {r['measurements']} measurements in {r['processes']} processes "
                 f"(full grid: {r['full_grid_measurements']}), {r['wall_s']:.1f} s")
    return "\n".join(lines)
