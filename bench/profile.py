"""Knee profiling cost and the Slice-Tune check.

1. Runs the adaptive profile (services/tuner/profiler.py) of the default grid, or the one given,
   on the model (default: the tiny model) and reports the knees and what profiling cost
   (measurements, processes, wall time) against the full grid.
2. Slice-Tune check, decode at the longest profiled context (and, for an MoE model, the
   experts stage at the largest call size): the config the tuner picks at share 1.0 and the
   one it picks at each smaller share, both run again at that smaller share in one process,
   side by side (p95 step time: the inter-token latency for decode, one expert micro-batch for
   experts; and tokens/s, routed tokens/s for experts).

Shares: CPU thread counts (+ affinity) on CPU, MPS percentages on a GPU. Prints tables and
writes JSON with machine, device and commit to bench/results/.

    python bench/profile.py [--model DIR] [--device cpu|cuda] [--shares 0.3,0.5,1]
        [--stages prefill,decode,experts] [--slo-decode-ms 100] [--slo-experts-ms 100]
        [--reps 5] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/: bench/profile.py must not shadow stdlib profile

from bench.meta import commit, machine  # noqa: E402
from services.engine.moe_config import is_moe_dir  # noqa: E402
from services.engine.tiny import ensure_tiny_model  # noqa: E402
from services.tuner.probe import ProbeItem  # noqa: E402
from services.tuner.profiler import ProfileGrid, SubprocessProbe, device_kind, format_report, profile  # noqa: E402
from services.tuner.selection import choose  # noqa: E402
from services.tuner.shares import MpsDaemon, ShareMechanism  # noqa: E402


def slice_tune(result, probe, model: str, device: str, shares: list[float], stage: str, workload: dict,
               slo_ms: float) -> list[dict]:
    table = result.table
    top = max(shares)
    tuned_full = choose(table.points_at(model, stage, device, top, workload), 0.0, slo_ms).config
    rows = []
    for share in sorted(s for s in shares if s < top):
        tuned_here = choose(table.points_at(model, stage, device, share, workload), 0.0, slo_ms).config
        items = [ProbeItem(stage, dict(tuned_full), workload)]
        if tuned_here != tuned_full:
            items.append(ProbeItem(stage, dict(tuned_here), workload))
        measured = probe(share, items)
        full, here = measured[0], measured[-1]
        rows.append({
            "stage": stage, "share": share, **workload, "slo_ms": slo_ms,
            "tuned_at_full": {"config": tuned_full, "itl_p95_ms": full.latency_p95_ms,
                              "tokens_per_s": full.throughput_tokens_per_s},
            "tuned_at_share": {"config": tuned_here, "itl_p95_ms": here.latency_p95_ms,
                               "tokens_per_s": here.throughput_tokens_per_s},
        })
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--shares", default="", help="default: every thread count on CPU, MPS 10..100%% on GPU")
    ap.add_argument("--stages", default="", help="default: prefill,decode, and experts for an MoE model")
    ap.add_argument("--decode-batches", default="")
    ap.add_argument("--context-lens", default="")
    ap.add_argument("--slo-decode-ms", type=float, default=100.0)
    ap.add_argument("--slo-prefill-ms", type=float, default=500.0)
    ap.add_argument("--slo-experts-ms", type=float, default=100.0, help="p95 of one expert micro-batch")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    model_dir = str(Path(args.model).resolve()) if args.model else str(ensure_tiny_model())
    model = Path(model_dir).name
    mechanism = ShareMechanism.for_device(args.device)
    shares = [float(s) for s in args.shares.split(",")] if args.shares else mechanism.grid(0.1)
    defaults = ProfileGrid()
    stages = tuple(args.stages.split(",")) if args.stages else defaults.stages + (
        ("experts",) if is_moe_dir(model_dir) else ())
    grid = ProfileGrid(
        stages=stages,
        decode_batches=tuple(int(b) for b in args.decode_batches.split(",")) if args.decode_batches
        else defaults.decode_batches,
        context_lens=tuple(int(c) for c in args.context_lens.split(",")) if args.context_lens
        else defaults.context_lens,
        slo_decode_ms=args.slo_decode_ms, slo_prefill_ms=args.slo_prefill_ms, slo_experts_ms=args.slo_experts_ms,
    )
    checks = []  # (stage, workload, SLO) of the Slice-Tune check
    if "decode" in stages:
        checks.append(("decode", {"context_len": max(grid.context_lens)}, args.slo_decode_ms))
    if "experts" in stages:
        checks.append(("experts", {"call_tokens": max(grid.experts_call_tokens)}, args.slo_experts_ms))
    probe = SubprocessProbe(model_dir, args.device, args.dtype, mechanism, reps=args.reps)
    device = device_kind(args.device)
    started = time.monotonic()
    def run():
        result = profile(grid, shares, probe, model, device)
        profiled_s = time.monotonic() - started
        return result, profiled_s, [row for stage, workload, slo in checks
                                    for row in slice_tune(result, probe, model, device, shares, stage, workload, slo)]

    if mechanism.kind == "mps":
        with MpsDaemon():
            result, profiled_s, check = run()
    else:
        result, profiled_s, check = run()
    print(format_report(result))
    for stage, workload, slo in checks:
        print()
        print(f"Slice-Tune check ({stage}, {workload}, SLO p95 step <= {slo:g} ms)")
        print(f"{'share':>5}  {'tuned at 100%':30} {'p95 ms':>7} {'tok/s':>8}   "
              f"{'tuned at this share':30} {'p95 ms':>7} {'tok/s':>8}")
        for row in (r for r in check if r["stage"] == stage):
            a, b = row["tuned_at_full"], row["tuned_at_share"]
            fmt = lambda c: ",".join(f"{k}={v}" for k, v in c.items())  # noqa: E731
            print(f"{row['share']:>5.2f}  {fmt(a['config']):30} {a['itl_p95_ms']:>7.2f} {a['tokens_per_s']:>8.1f}   "
                  f"{fmt(b['config']):30} {b['itl_p95_ms']:>7.2f} {b['tokens_per_s']:>8.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile-{args.device.replace(':', '')}-{int(time.time())}.json"
    path.write_text(json.dumps({
        "benchmark": "profile", "machine": machine(), "device": device, "commit": commit(), "model": model,
        "shares": shares, "grid": grid.__dict__, **result.report(), "slice_tune": check,
        "profile_wall_s": round(profiled_s, 3), "total_wall_s": round(time.monotonic() - started, 3),
        "table": json.loads(result.table.to_json()),
    }, indent=1, default=list) + "\n")
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
