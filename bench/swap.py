"""Swap preemption vs recompute: what bringing back a preempted sequence of n tokens costs.

recompute: one prefill chunk of n tokens over the paged cache (what a recomputed sequence
runs before it decodes again); swap: its KV blocks copied to the host swap space and back
(services/engine/host_kv_cache.py), as a swap-out and a swap-in do. On CPU both pools are RAM.
The ratio picks DecodeConfig.swap_min_tokens: below the length where the copies stop being
cheaper, recompute.

    python bench/swap.py --shape tiny --shape mid --tokens 16 --tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench/profile.py would shadow the stdlib `profile`

from bench.engine import BLOCK_SIZE, SHAPES, build  # noqa: E402
from bench.meta import commit, machine  # noqa: E402
from bench.step_profile import MID  # noqa: E402
from services.engine.batch import SeqWork, build_batch  # noqa: E402
from services.engine.block_manager import blocks_for_tokens  # noqa: E402
from services.engine.host_kv_cache import HostKvCache  # noqa: E402
from services.engine.kv_cache import PagedKvCache  # noqa: E402


def median_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return sorted(samples)[len(samples) // 2]


def case(model, n: int, iters: int) -> dict:
    cfg, cpu = model.config, torch.device("cpu")
    blocks = blocks_for_tokens(n, BLOCK_SIZE)
    cache = PagedKvCache(cfg, 2 * blocks + 1, BLOCK_SIZE, torch.float32, cpu)
    host = HostKvCache(cfg, blocks, BLOCK_SIZE, torch.float32, pin=False)
    table = list(range(1, blocks + 1))
    back = list(range(blocks + 1, 2 * blocks + 1))  # swap-in lands in other blocks, as after a preemption
    tokens = torch.randint(5, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    recompute = median_ms(lambda: model.forward_paged(
        build_batch([SeqWork(tokens, 0, table, sample=True)], BLOCK_SIZE, cpu), cache), 1, iters)
    slots = list(range(blocks))

    def swap():
        host.swap_out(cache, table, slots)
        host.swap_in(cache, slots, back)

    swap_ms = median_ms(swap, 2, iters)
    kv_bytes = cfg.kv_bytes_per_token(4) * n
    return {"tokens": n, "kv_bytes": kv_bytes, "recompute_ms": recompute, "swap_ms": swap_ms,
            "ratio": recompute / swap_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", choices=["tiny", "mid"], help="repeatable; default both")
    ap.add_argument("--tokens", type=int, action="append", help="repeatable; default 16, 64, 256, 1024")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as a decode worker on the 2-core box runs
    SHAPES.setdefault("mid", MID)
    rows = []
    with torch.inference_mode():
        for shape in args.shape or ["tiny", "mid"]:
            model = build(shape, torch.device("cpu"), torch.float32)
            for n in args.tokens or [16, 64, 256, 1024]:
                rows.append({"shape": shape, **case(model, n, args.iters)})
                print(f"{shape:<5} {n:>5} tokens: recompute {rows[-1]['recompute_ms']:8.2f} ms, "
                      f"swap out+in {rows[-1]['swap_ms']:7.3f} ms", flush=True)
    result = {"machine": machine(), "device": "cpu", "torch": torch.__version__, "commit": commit(),
              "load_average": os.getloadavg(), "rows": rows}
    print(f"\nswap out+in vs recompute, fp32, 1 thread, commit {result['commit']}, "
          f"load average {result['load_average'][0]:.1f}")
    print(f"{'shape':<6}{'tokens':>7}{'KV MiB':>9}{'recompute ms':>14}{'swap ms':>10}{'recompute/swap':>16}")
    for r in rows:
        print(f"{r['shape']:<6}{r['tokens']:>7}{r['kv_bytes'] / 2**20:>9.2f}{r['recompute_ms']:>14.2f}"
              f"{r['swap_ms']:>10.3f}{r['ratio']:>16.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"swap-cpu-{result['commit']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
