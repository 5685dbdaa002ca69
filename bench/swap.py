"""Preemption cost: swap out + swap in of a sequence's KV against recomputing it.

For each sequence length L, on a model of a given shape with fixed-seed random weights:
- recompute: the prefill the scheduler runs after a recompute preemption, L tokens from
  position 0 through `forward_paged` into the sequence's blocks;
- swap: `HostKvCache.swap_out` of the L tokens' blocks, then `swap_in` into other blocks
  (on CPU a second pool in RAM, on GPU pinned host memory).
The ratio is what the swap rule (`swap_min_tokens`, services/decode/scheduler.py) trades:
below the length where recompute gets dearer than the copy, recompute. Writes JSON with
the machine, device and commit.

    python bench/swap.py --shape tiny --device cpu
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # as bench/engine.py: bench/profile.py must not shadow stdlib

from bench.engine import SHAPES, build, timed  # noqa: E402
from bench.meta import commit, machine, write_json  # noqa: E402
from services.engine.batch import SeqWork, build_batch  # noqa: E402
from services.engine.block_manager import blocks_for_tokens  # noqa: E402
from services.engine.host_kv_cache import HostKvCache  # noqa: E402
from services.engine.kv_cache import PagedKvCache  # noqa: E402

BLOCK_SIZE = 16


def measure(model, device: torch.device, dtype: torch.dtype, length: int) -> dict:
    cfg = model.config
    n = blocks_for_tokens(length, BLOCK_SIZE)
    cache = PagedKvCache(cfg, 2 * n, BLOCK_SIZE, dtype, device)  # the first n: before the swap, the last n: after
    host = HostKvCache(cfg, n, BLOCK_SIZE, dtype, pin=device.type == "cuda")
    tokens = torch.randint(0, cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    batch = build_batch([SeqWork(tokens, 0, list(range(n)), sample=True)], BLOCK_SIZE, device)
    recompute = timed(lambda: model.forward_paged(batch, cache), device, warmup=1, iters=5)
    first, second = list(range(n)), list(range(n, 2 * n))

    def swap() -> None:
        host.swap_out(cache, first, list(range(n)))
        host.swap_in(cache, list(range(n)), second)

    ms = timed(swap, device, warmup=2, iters=10)
    assert all(torch.equal(t[:n], t[n:]) for t in cache.k + cache.v)  # the copy is the real thing
    kv_bytes = n * PagedKvCache.block_bytes(cfg, BLOCK_SIZE, dtype)
    return {"tokens": length, "blocks": n, "kv_bytes": kv_bytes, "recompute_ms": recompute, "swap_ms": ms,
            "ratio": recompute / ms, "swap_gb_s": 2 * kv_bytes / ms / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", default="16,64,256,1024,1984")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)  # as a decode worker on the 2-core box runs (ELASTUNE_THREADS=1)
    model = build(args.shape, device, dtype)
    rows = [measure(model, device, dtype, int(x)) for x in args.lengths.split(",")]
    result = {"machine": machine(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "commit": commit(), "shape": args.shape, "dtype": str(dtype),
              "block_size": BLOCK_SIZE, "load_average": os.getloadavg(), "rows": rows}
    print(f"\n{args.shape} {dtype} on {result['device']}, commit {result['commit']}, load {result['load_average']}")
    print(f"{'tokens':>7} {'KV MiB':>8} {'recompute ms':>13} {'swap out+in ms':>15} {'recompute/swap':>15} {'GB/s':>6}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['kv_bytes'] / 2**20:>8.2f} {r['recompute_ms']:>13.2f} {r['swap_ms']:>15.3f} "
              f"{r['ratio']:>15.1f} {r['swap_gb_s']:>6.2f}")
    write_json(Path(args.out) / f"swap-{args.shape}-{device.type}-{result['commit']}.json", result)


if __name__ == "__main__":
    main()
