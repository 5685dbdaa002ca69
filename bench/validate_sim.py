"""Check the simulator against the real local stack: the same workload on both, three load levels.

For each rate, one `elastic` run on `elastune up --autoscale` (tiny model, k8s/local ScaledObjects)
and one in the simulator with the tiny model's CPU profile and the same ScaledObjects (their
trigger metadata parsed by the scaler's parser, their HPA behaviour). Compares p95 TTFT and mean
replicas per stage; the issue's goal is agreement within 20%. Prints a table and writes JSON
with the machine, device and commit.

    python bench/validate_sim.py --rates 1,3,6 --duration 60
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/: bench/profile.py must not shadow stdlib profile

from bench.meta import commit, machine, write_json  # noqa: E402
from services.experiment.runner import run_experiment  # noqa: E402

GOAL = 0.20


def config(mode: str, rate: float, duration: float, seed: int, profile: str) -> dict:
    return {
        "name": f"validate-{mode}-{rate:g}".replace(".", "_"), "seed": seed, "mode": mode, "runs": ["elastic"],
        "workload": {"kind": "poisson", "rate": rate, "duration_s": duration, "prompt_median": 48,
                     "output_median": 48, "max_context": 512, "max_output": 96},
        "slo": {"ttft_s": 1.0, "tpot_s": 0.1},
        "sim": {"profile": profile, "gpus": 8, "interval_s": 2, "window_s": 5, "scaledobjects": "k8s/local"},
        "real": {"scaledobjects": "k8s/local", "vocab": 4096, "sample_s": 1.0},
    }


def figures(folder: Path) -> dict:
    s = json.loads((folder / "summary.json").read_text())["runs"]["elastic"]
    return {"ttft_p95_ms": s["ttft_p95_ms"], "slo_attainment": s["slo_attainment"],
            **{f"{st}_mean_replicas": s["stages"][st]["mean_replicas"] for st in ("prefill", "decode")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="1,3,6")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default="experiments/profiles/tiny-cpu.json")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--results", default="results/validation", help="where the experiment folders go")
    args = ap.parse_args()
    rows = []
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    for rate in (float(r) for r in args.rates.split(",")):
        got, folders = {}, {}
        for mode in ("real", "sim"):
            path = results / f"{mode}-{rate:g}.yaml"
            path.write_text(yaml.safe_dump(config(mode, rate, args.duration, args.seed, args.profile)))
            if mode == "real":
                load_before = os.getloadavg()[0]
            folders[mode] = run_experiment(path, results)
            got[mode] = figures(folders[mode])
            if mode == "real":  # the 1-minute load average: how busy the box was (the stack included)
                loadavg = {"before": load_before, "after": os.getloadavg()[0]}
        row = {"rate": rate, "real": got["real"], "sim": got["sim"], "folders": {k: str(v) for k, v in folders.items()},
               "loadavg_1m": loadavg}
        for key in ("ttft_p95_ms", "prefill_mean_replicas", "decode_mean_replicas"):
            real, sim = got["real"][key], got["sim"][key]
            row[f"{key}_rel_diff"] = abs(sim - real) / real if real else None
        rows.append(row)
    result = {"machine": machine(), "device": "cpu", "commit": commit(), "duration_s": args.duration,
              "goal_rel_diff": GOAL, "rows": rows}
    print(f"\nsim vs real, elastic, k8s/local ScaledObjects, {args.duration:.0f} s Poisson per level, commit {result['commit']}")
    print(f"{'req/s':>6} {'TTFT p95 real':>14} {'sim':>8} {'diff':>6} {'prefill real':>13} {'sim':>6} {'diff':>6} "
          f"{'decode real':>12} {'sim':>6} {'diff':>6}")
    for r in rows:
        def d(key: str) -> str:
            v = r[f"{key}_rel_diff"]
            return "-" if v is None else f"{v:.0%}"

        print(f"{r['rate']:>6g} {r['real']['ttft_p95_ms']:>14.0f} {r['sim']['ttft_p95_ms']:>8.0f} {d('ttft_p95_ms'):>6} "
              f"{r['real']['prefill_mean_replicas']:>13.2f} {r['sim']['prefill_mean_replicas']:>6.2f} "
              f"{d('prefill_mean_replicas'):>6} {r['real']['decode_mean_replicas']:>12.2f} "
              f"{r['sim']['decode_mean_replicas']:>6.2f} {d('decode_mean_replicas'):>6}   "
              f"load {r['loadavg_1m']['before']:.1f} -> {r['loadavg_1m']['after']:.1f}")
    write_json(Path(args.out) / f"validate_sim-{result['commit']}.json", result)


if __name__ == "__main__":
    main()
