"""Measure the tiny model on this CPU and write a simulator profile (services/sim/profile.py).

Times the serving model code (services/engine) with one torch thread, as a local worker runs it:
decode steps over a grid of batch sizes and contexts, prefill over prompt lengths and batch
sizes; fits the profile's linear service-time models by least squares and writes the profile
JSON with the fit's residuals, the raw samples, the machine and the commit.

With --stack it instead calibrates the profile's `stack` block on the real local stack
(`elastune up --autoscale`, 1 prefill + 1 decode worker, k8s/local), keeping the model fit:
requests are sent one at a time (spaced so none overlaps), so the difference between a
request's end-to-end TTFT and the profile's prefill time is what the stack adds per request,
and the difference between its time per output token and the profile's decode step is what the
serving loop adds per step. The CPU time of every process that is not a worker (gateway,
launcher and autoscaler, store, this load client) is read from /proc while idle and during two
phases with short and long outputs, giving the host's background load per second, per request
and per output token. See bench/stack_calibration.py.

    python bench/profile_tiny.py --out experiments/profiles/tiny-cpu.json
    python bench/profile_tiny.py --stack --out experiments/profiles/tiny-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/: bench/profile.py must not shadow stdlib profile

from bench.engine import build  # noqa: E402
from bench.meta import commit, machine  # noqa: E402
from services.engine.kv_cache import KvCache  # noqa: E402


def min_ms(fn, iters: int) -> float:
    """The fastest of `iters` runs: on a shared box the minimum is the uncontended time."""
    fn()  # warm-up
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return float(min(samples))


def decode_samples(model, iters: int) -> list[dict]:
    cfg, rows = model.config, []
    for batch in (1, 4, 16, 32, 64):
        for context in (32, 256, 768):
            cache = KvCache(cfg, batch, context + 8, torch.float32, torch.device("cpu"))
            tokens = torch.randint(0, cfg.vocab_size, (batch,))
            positions = torch.full((batch,), context)
            slots = torch.arange(batch)
            ms = min_ms(lambda: model.decode(tokens, positions, slots, cache, (0, batch), context + 1), iters)
            rows.append({"batch": batch, "context": context, "ms": ms})
    return rows


def prefill_samples(model, iters: int) -> list[dict]:
    cfg, rows = model.config, []
    for batch in (1, 4):
        for length in (16, 64, 256, 512):
            prompt = torch.randint(0, cfg.vocab_size, (batch, length))
            lengths = torch.full((batch,), length)
            with torch.inference_mode():
                ms = min_ms(lambda: model.prefill(prompt, lengths), iters)
            rows.append({"batch": batch, "length": length, "ms": ms})
    return rows


def fit(rows: list[list[float]], target: list[float]) -> tuple[list[float], float]:
    """Non-negative-ish least squares (negative coefficients clipped to 0, then refit the rest)."""
    x, y = np.array(rows, dtype=float), np.array(target, dtype=float)  # rows: samples
    keep = list(range(x.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep = [k for k, c in zip(keep, coef) if c >= 0]
    full = np.zeros(x.shape[1])
    full[keep] = np.clip(coef, 0, None)
    rel = np.abs(x @ full - y) / y
    return full.tolist(), float(rel.max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/profiles/tiny-cpu.json")
    ap.add_argument("--iters", type=int, default=9)
    ap.add_argument("--stack", action="store_true", help="calibrate the stack block of the existing profile")
    args = ap.parse_args()
    if args.stack:
        from bench.stack_calibration import calibrate

        calibrate(Path(args.out))
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build("tiny", torch.device("cpu"), torch.float32)
    dec = decode_samples(model, args.iters)
    pre = prefill_samples(model, args.iters)
    # decode step = overhead + per_seq * B + per_ctx_token * (B * context): all CPU work, summed.
    (d0, d1, d2), d_err = fit([[1, r["batch"], r["batch"] * r["context"]] for r in dec], [r["ms"] for r in dec])
    # prefill = overhead + per_token * tokens + per_token_sq * sum(len^2) + per_seq * B
    cols = [[1, r["batch"] * r["length"], r["batch"] * r["length"] ** 2, r["batch"]] for r in pre]
    (p0, p1, p2, p3), p_err = fit(cols, [r["ms"] for r in pre])
    profile = {
        "name": "tiny-cpu",
        "source": (f"measured: bench/profile_tiny.py, tiny Llama model, 1 torch thread, on {machine()['host']} "
                   f"({machine()['cpus']} CPUs), commit {commit()}; a pod's share is its fraction of one core "
                   "(time slicing: every term slows in proportion)"),
        "device": "cpu",
        "gpus_label": "core",
        "prefill": {"overhead_ms": p0, "ms_per_token": p1, "ms_per_token_sq": p2, "ms_per_seq": p3,
                    "max_batch_tokens": 2048, "max_batch_size": 8},
        "decode": {"combine": "sum", "overhead_ms": 0.0, "weight_ms": d0, "kv_ms_per_token": d2,
                   "compute_ms_per_seq": d1, "bandwidth_by_share": [[0.0, 0.0], [1.0, 1.0]],
                   "max_batch_size": 64, "kv_capacity_tokens": 64 * 2048},
        "kv_transfer_ms_per_token": 0.002,
        "cold_start_s": {"prefill": 6.0, "decode": 6.0},
        "fit": {"decode_max_rel_error": d_err, "prefill_max_rel_error": p_err},
        "samples": {"decode": dec, "prefill": pre},
        "machine": machine(),
        "commit": commit(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=2) + "\n")
    print(f"{'decode batch':>12} {'context':>8} {'ms':>8}")
    for r in dec:
        print(f"{r['batch']:>12} {r['context']:>8} {r['ms']:>8.2f}")
    print(f"{'prefill batch':>13} {'length':>7} {'ms':>8}")
    for r in pre:
        print(f"{r['batch']:>13} {r['length']:>7} {r['ms']:>8.2f}")
    print(f"decode fit: {d0:.3f} ms + {d1:.4f} ms/seq + {d2 * 1000:.4f} us/ctx token (max error {d_err:.1%})")
    print(f"prefill fit: {p0:.3f} ms + {p1 * 1000:.3f} us/token + {p2 * 1e6:.4f} ns/token^2 + {p3:.3f} ms/seq "
          f"(max error {p_err:.1%})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
