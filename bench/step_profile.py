"""Where a decode step's time goes: the paged step (`CausalLM.forward_paged`) beside the old
whole-context slot layout (`CausalLM.decode`) at batch 1/8/64 and context 128/512, for the
tiny model and a mid-size CPU shape, with torch.profiler's split of the paged step by op.

Times are CPU time of the calling thread (one torch thread), median of `--iters`, so other
sessions on a shared box inflate them less than wall clock would. Writes JSON with the
machine, device and commit.

    python bench/step_profile.py                       # tiny and mid, every case
    python bench/step_profile.py --shape tiny --batch 64 --context 512
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# replace (not prepend to) the script folder: bench/profile.py would shadow the stdlib `profile`
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.engine import BLOCK_SIZE, SHAPES, build  # noqa: E402
from bench.meta import commit, machine, write_json  # noqa: E402
from services.engine.batch import SeqWork, build_batch  # noqa: E402
from services.engine.block_manager import blocks_for_tokens  # noqa: E402
from services.engine.kv_cache import KvCache, PagedKvCache  # noqa: E402

MID = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
           intermediate_size=2816, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0)
# ops grouped the way the step is discussed: what reads the paged blocks, attention itself,
# the weight matmuls, and everything else (norms, RoPE, residual adds, index tensors)
GROUPS = {
    "gather": ("aten::index_select",),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                  "aten::_softmax", "aten::bmm", "aten::where", "aten::masked_fill_"),
    "matmul": ("aten::mm", "aten::addmm"),
    "kv write": ("aten::index_copy_",),
}


def cpu_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t = time.thread_time()
        fn()
        samples.append((time.thread_time() - t) * 1000)
    return sorted(samples)[len(samples) // 2]


def op_split(fn, steps: int = 3) -> dict[str, float]:
    """ms per step by op group (self CPU time from torch.profiler; the profiler adds its own)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    split: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        group = next((g for g, names in GROUPS.items() if ev.key in names), "other")
        split[group] += ev.self_cpu_time_total / 1000 / steps
    return dict(split)


def case(model, batch: int, context: int, iters: int) -> dict:
    cfg = model.config
    cpu = torch.device("cpu")
    steps = iters + 2
    per_seq = blocks_for_tokens(context + steps + 1, BLOCK_SIZE)
    paged = PagedKvCache(cfg, batch * per_seq, BLOCK_SIZE, torch.float32, cpu)
    # block tables interleaved across sequences, as a pool that has been in use hands them out
    tables = [list(range(b, batch * per_seq, batch)) for b in range(batch)]

    def work(offset: int, seq_ids: bool) -> list[SeqWork]:
        return [SeqWork([1], context + offset, tables[b], sample=True, seq_id=b if seq_ids else -1)
                for b in range(batch)]

    build_ms = cpu_ms(lambda: build_batch(work(0, True), BLOCK_SIZE, cpu), 2, iters)
    step = build_batch(work(0, False), BLOCK_SIZE, cpu)  # no sequence ids: every step gathers
    gather_ms = cpu_ms(lambda: model.forward_paged(step, paged), 2, iters)
    split = op_split(lambda: model.forward_paged(step, paged))
    # steady decode: the same sequences one position further each step, so the mirror appends
    steady = iter([build_batch(work(j, True), BLOCK_SIZE, cpu) for j in range(steps)])
    mirror_ms = cpu_ms(lambda: model.forward_paged(next(steady), paged), 2, iters)
    mirror_split = op_split(lambda: model.forward_paged(build_batch(work(steps, True), BLOCK_SIZE, cpu), paged), 1)
    del paged
    slots = KvCache(cfg, batch, context + 1, torch.float32, cpu)
    tokens = torch.ones(batch, dtype=torch.long)
    positions = torch.full((batch,), context)
    seats = torch.arange(batch)
    slot_ms = cpu_ms(lambda: model.decode(tokens, positions, seats, slots, (0, batch), context + 1), 2, iters)
    return {"batch": batch, "context": context, "build_ms": build_ms, "paged_ms": gather_ms, "mirror_ms": mirror_ms,
            "slot_ms": slot_ms, "split_ms": split, "mirror_split_ms": mirror_split}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", choices=["tiny", "mid"], help="repeatable; default both")
    ap.add_argument("--batch", type=int, action="append", help="repeatable; default 1, 8, 64")
    ap.add_argument("--context", type=int, action="append", help="repeatable; default 128, 512")
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as a decode worker on the 2-core box runs
    SHAPES.setdefault("mid", MID)
    rows = []
    for shape in args.shape or ["tiny", "mid"]:
        model = build(shape, torch.device("cpu"), torch.float32)
        for context in args.context or [128, 512]:
            for batch in args.batch or [1, 8, 64]:
                rows.append({"shape": shape, **case(model, batch, context, args.iters)})
                r = rows[-1]
                print(f"{shape:<5} batch {batch:>3} context {context:>4}: paged {r['paged_ms']:7.2f} ms, "
                      f"mirror {r['mirror_ms']:7.2f} ms, slot layout {r['slot_ms']:7.2f} ms", flush=True)
    result = {"machine": machine(), "device": "cpu", "torch": torch.__version__, "commit": commit(),
              "load_average": os.getloadavg(), "rows": rows}
    groups = list(GROUPS) + ["other"]
    print(f"\nCPU ms per decode step (thread time, 1 thread), commit {result['commit']}, "
          f"load average {result['load_average'][0]:.1f}")
    print("paged: every step gathers the rows' blocks; mirror: steady decode over the kept rows;"
          " slots: the old whole-context layout; then the paged (gather) step split by op")
    print(f"{'shape':<6}{'batch':>6}{'ctx':>6}{'paged':>9}{'mirror':>9}{'slots':>9}{'build':>7}"
          + "".join(f"{g:>11}" for g in groups))
    for r in rows:
        print(f"{r['shape']:<6}{r['batch']:>6}{r['context']:>6}{r['paged_ms']:>9.2f}{r['mirror_ms']:>9.2f}"
              f"{r['slot_ms']:>9.2f}{r['build_ms']:>7.2f}" + "".join(f"{r['split_ms'].get(g, 0.0):>11.2f}" for g in groups))
    write_json(Path(args.out) / f"step-profile-cpu-{result['commit']}.json", result)


if __name__ == "__main__":
    main()
