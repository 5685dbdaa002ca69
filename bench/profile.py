"""Knee profiling cost and the Slice-Tune check.

1. Runs the adaptive profile (services/tuner/profiler.py) of the default grid, or the one given,
   on the model (default: the tiny model) and reports the knees and what profiling cost
   (measurements, processes, wall time) against the full grid.
2. Slice-Tune check, decode at the longest profiled context: the config the tuner picks at
   share 1.0 and the one it picks at each smaller share, both run again at that smaller share
   in one process, side by side (p95 inter-token latency = p95 step time, and tokens/s).

Shares: CPU thread counts (+ affinity) on CPU, MPS percentages on a GPU. Prints tables and
writes JSON with machine, device and commit to bench/results/.

    python bench/profile.py [--model DIR] [--device cpu|cuda] [--shares 0.3,0.5,1]
        [--slo-decode-ms 100] [--reps 5] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.meta import commit, machine  # noqa: E402
from services.engine.tiny import ensure_tiny_model  # noqa: E402
from services.tuner.probe import ProbeItem  # noqa: E402
from services.tuner.profiler import ProfileGrid, SubprocessProbe, device_kind, format_report, profile  # noqa: E402
from services.tuner.selection import choose  # noqa: E402
from services.tuner.shares import MpsDaemon, ShareMechanism  # noqa: E402


def slice_tune(result, probe, model: str, device: str, shares: list[float], context: int, slo_ms: float) -> list[dict]:
    table = result.table
    workload = {"context_len": context}
    top = max(shares)
    tuned_full = choose(table.points_at(model, "decode", device, top, workload), 0.0, slo_ms).config
    rows = []
    for share in sorted(s for s in shares if s < top):
        tuned_here = choose(table.points_at(model, "decode", device, share, workload), 0.0, slo_ms).config
        items = [ProbeItem("decode", dict(tuned_full), workload)]
        if tuned_here != tuned_full:
            items.append(ProbeItem("decode", dict(tuned_here), workload))
        measured = probe(share, items)
        full, here = measured[0], measured[-1]
        rows.append({
            "share": share, "context_len": context, "slo_ms": slo_ms,
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
    ap.add_argument("--decode-batches", default="")
    ap.add_argument("--context-lens", default="")
    ap.add_argument("--slo-decode-ms", type=float, default=100.0)
    ap.add_argument("--slo-prefill-ms", type=float, default=500.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    model_dir = str(Path(args.model).resolve()) if args.model else str(ensure_tiny_model())
    model = Path(model_dir).name
    mechanism = ShareMechanism.for_device(args.device)
    shares = [float(s) for s in args.shares.split(",")] if args.shares else mechanism.grid(0.1)
    defaults = ProfileGrid()
    grid = ProfileGrid(
        decode_batches=tuple(int(b) for b in args.decode_batches.split(",")) if args.decode_batches
        else defaults.decode_batches,
        context_lens=tuple(int(c) for c in args.context_lens.split(",")) if args.context_lens
        else defaults.context_lens,
        slo_decode_ms=args.slo_decode_ms, slo_prefill_ms=args.slo_prefill_ms,
    )
    probe = SubprocessProbe(model_dir, args.device, args.dtype, mechanism, reps=args.reps)
    device = device_kind(args.device)
    started = time.monotonic()
    if mechanism.kind == "mps":
        with MpsDaemon():
            result = profile(grid, shares, probe, model, device)
            check = slice_tune(result, probe, model, device, shares, max(grid.context_lens), args.slo_decode_ms)
    else:
        result = profile(grid, shares, probe, model, device)
        check = slice_tune(result, probe, model, device, shares, max(grid.context_lens), args.slo_decode_ms)
    print(format_report(result))
    print()
    print(f"Slice-Tune check (decode, context {max(grid.context_lens)}, SLO p95 step <= {args.slo_decode_ms:g} ms)")
    print(f"{'share':>5}  {'tuned at 100%':30} {'p95 ms':>7} {'tok/s':>8}   {'tuned at this share':30} {'p95 ms':>7} {'tok/s':>8}")
    for row in check:
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
        "total_wall_s": round(time.monotonic() - started, 3),
        "table": json.loads(result.table.to_json()),
    }, indent=1, default=list) + "\n")
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
