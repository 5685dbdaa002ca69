"""How fast the cluster simulator replays the 58-minute Azure conversation trace at 16-GPU scale.

Builds the headline experiment's workload (experiments/azure-headline-h100.yaml) with the trace's
requests multiplied by --multiplier (17.5: static-at-peak needs 16 GPUs of the H100-shaped
profile; the headline's 23x needs 21), then times simulate() for the given runs (default:
static_peak and elastic_tuned) after one warm-up on a short slice: wall time and the process's
CPU time (on a shared box the CPU time is what the simulator itself costs). Prints a table and
writes JSON with the machine, device and commit.

    python bench/sim_speed.py                        # goal: <= 60 s per run on the 2-core box
    python bench/sim_speed.py --runs elastic_tuned --repeat 3
    python bench/sim_speed.py --moe 8,2,4,1.2          # with an MoE experts stage (4 groups, Zipf 1.2)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/: bench/profile.py must not shadow stdlib profile

from bench.meta import commit, machine, write_json  # noqa: E402
from services.experiment.baselines import demand, sim_config  # noqa: E402
from services.experiment.config import MoeSection, load  # noqa: E402
from services.experiment.workload import build  # noqa: E402
from services.sim.profile import load_profile  # noqa: E402
from services.sim.simulator import simulate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="experiments/azure-headline-h100.yaml")
    ap.add_argument("--runs", default="static_peak,elastic_tuned")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--multiplier", type=float, default=17.5, help="requests x the trace (0: the config's)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--moe", default="", help="experts,top_k,groups,skew: turn the experts stage on, e.g. 8,2,4,1.2")
    ap.add_argument("--gpus", type=int, default=0, help="cluster size (0: the config's)")
    args = ap.parse_args()
    cfg = load(args.config)
    if args.gpus:
        cfg = replace(cfg, sim=replace(cfg.sim, gpus=args.gpus))
    if args.moe:
        experts, top_k, groups, skew = args.moe.split(",")
        cfg = replace(cfg, moe=MoeSection(int(experts), int(top_k), int(groups), float(skew)))
    if args.multiplier:
        cfg = replace(cfg, workload=replace(cfg.workload, rate_multiplier=args.multiplier))
    started = time.perf_counter()
    requests = build(cfg.workload, cfg.seed)
    build_s = time.perf_counter() - started
    profile = load_profile(cfg.sim.profile)
    need = demand(requests)
    columns = ([r.arrival_s for r in requests], [r.prompt_tokens for r in requests], [r.output_tokens for r in requests])
    warm = [c[: len(requests) // 50] for c in columns]
    simulate(sim_config(cfg, "elastic_tuned", profile, need), *warm)  # warm-up: imports, caches
    rows = []
    for run in args.runs.split(","):
        setup = sim_config(cfg, run, profile, need)
        for i in range(args.repeat):
            t, cpu = time.perf_counter(), time.process_time()
            data = simulate(setup, *columns)
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
            rows.append({"run": run, "repeat": i, "requests": len(requests), "events": data.stats["events"],
                         "wall_s": wall, "cpu_s": cpu, "events_per_s": data.stats["events"] / wall,
                         "peak_pods": data.stats["peak_pods"], "mean_gpus": data.share_seconds / data.duration_s,
                         "simulated_s": data.duration_s})
    result = {"machine": machine(), "device": "cpu", "commit": commit(), "config": args.config, "moe": args.moe,
              "gpus": cfg.sim.gpus,
              "workload_build_s": build_s, "rows": rows}
    print(f"\n{len(requests)} requests ({cfg.workload.rate_multiplier}x the Azure conversation trace), "
          f"built in {build_s:.1f} s; commit {result['commit']}")
    print(f"{'run':<18} {'events':>9} {'wall s':>8} {'CPU s':>7} {'events/s':>10} {'peak pods':>10} {'mean GPUs':>10} {'sim s':>8}")
    for r in rows:
        print(f"{r['run']:<18} {r['events']:>9} {r['wall_s']:>8.1f} {r['cpu_s']:>7.1f} {r['events_per_s']:>10.0f} "
              f"{r['peak_pods']:>10} {r['mean_gpus']:>10.1f} {r['simulated_s']:>8.0f}")
    write_json(Path(args.out) / f"sim_speed-{result['commit']}{'-moe' if args.moe else ''}.json", result)


if __name__ == "__main__":
    main()
