"""Engine benchmark: the serving engine's step times beside the floor, KV capacity, and
concurrent serving against sequential `transformers`.

1. Builds a model of a given shape with fixed-seed random weights directly on the device (no
   files), then times the paged decode step (batch 1 and 64, context 512) and a 2,048-token
   prefill with CUDA events (wall clock on CPU), each beside its floor: bytes the step must
   read at the device's memory bandwidth, or FLOPs at its matmul peak.
2. KV capacity: the block pool sized as the decode worker sizes it (a fraction of the memory
   left after the weights), and how many 2,048-token sequences it holds on an 80 GB GPU.
3. `--concurrent N` (CPU, tiny model): N requests through the decode engine (local chunked
   prefill + continuous batching) against `transformers` `generate()` one at a time on the
   same prompts, same run.
Writes JSON with the machine, device and commit.

    python bench/engine.py --shape llama3-8b --device cuda                 # the issue's GPU figures
    python bench/engine.py --shape tiny --device cpu --concurrent 64       # the 2-core CPU case
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

# replace (not prepend to) the script folder: bench/profile.py would shadow the stdlib `profile`
# that torch imports lazily (via cProfile)
sys.path[0] = str(Path(__file__).resolve().parents[1])

from services.engine.batch import SeqWork, build_batch  # noqa: E402
from services.engine.block_manager import blocks_for_budget, blocks_for_tokens  # noqa: E402
from services.engine.kv_cache import PagedKvCache  # noqa: E402
from services.engine.model import CausalLM  # noqa: E402
from services.engine.model_config import ModelConfig  # noqa: E402
from bench.meta import commit, machine, write_json  # noqa: E402

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0),
    "tiny": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=4096, max_position_embeddings=2048, rope_theta=10000.0),
}
# Reference peaks for the floor (DESIGN.md section 8): H100 device copy ~3.0 TB/s, bf16 matmul ~800 TFLOP/s.
PEAKS = {"cuda": (3.0e12, 800e12), "cpu": (20e9, 40e9)}
BLOCK_SIZE = 16
GPU_BYTES = 80e9
GPU_FRACTION = 0.9  # DecodeConfig.kv_gpu_fraction


def build(shape: str, device: torch.device, dtype: torch.dtype) -> CausalLM:
    config = ModelConfig.from_dict({"model_type": "llama", "rms_norm_eps": 1e-5, **SHAPES[shape]})
    torch.manual_seed(0)
    with torch.device("meta"):
        model = CausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.set_rope_tables(device, dtype)
    return model.eval()


def bf16_weight_bytes(cfg: ModelConfig) -> int:
    """Weights of the shape in bf16, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    return sum(p.numel() for p in model.parameters()) * 2


def concurrent_vs_hf(n: int, output_tokens: int, rounds: int = 2) -> dict:
    """n seeded prompts (16-128 tokens) on the tiny model: all at once through the decode engine,
    then one after another through transformers generate(); both greedy, one torch thread."""
    import queue

    from transformers import AutoModelForCausalLM

    from services.common.types import SamplingParams
    from services.decode.engine import DecodeEngine
    from services.decode.sequence import Sequence
    from services.engine.runner import ModelRunner
    from services.engine.tiny import ensure_tiny_model

    torch.set_num_threads(1)
    path = ensure_tiny_model()
    runner = ModelRunner(path, dtype="float32", threads=1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, runner.config.vocab_size, (int(torch.randint(16, 129, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(n)]
    params = SamplingParams(max_tokens=output_tokens, temperature=0, ignore_eos=True)
    budget = n * runner.config.max_model_len * runner.config.kv_bytes_per_token(4)

    def engine_run() -> tuple[float, float, list[list[int]]]:
        # a fresh engine (empty prefix cache) each run; building its KV pool is start-up, not serving
        engine = DecodeEngine(runner, n, n, None, kv_budget_bytes=budget, block_size=BLOCK_SIZE, token_budget=512)
        seqs = [Sequence(f"r{i}", -1, list(p), len(p), params, i, frozenset(), engine.max_seq_len,
                         outbox=queue.SimpleQueue()) for i, p in enumerate(prompts)]
        wall, cpu = time.perf_counter(), time.process_time()
        for s in seqs:
            assert engine.reserve(s)
            engine.add(s)
        engine.run_until_idle()
        return time.perf_counter() - wall, time.process_time() - cpu, [s.tokens[s.prompt_len:] for s in seqs]

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # run every request to output_tokens, as ignore_eos does

    def hf_run() -> tuple[float, float, list[list[int]]]:
        outs = []
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for p in prompts:
                out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=output_tokens, pad_token_id=0)
                outs.append(out[0, len(p):].tolist())
        return time.perf_counter() - wall, time.process_time() - cpu, outs

    engine_run()  # warm-up
    # alternate the two, best of `rounds` each: on a shared machine the load drifts between runs
    e_runs, h_runs = [], []
    for _ in range(rounds):
        e_runs.append(engine_run())
        h_runs.append(hf_run())
    e_wall, e_cpu = min(r[0] for r in e_runs), min(r[1] for r in e_runs)
    h_wall, h_cpu = min(r[0] for r in h_runs), min(r[1] for r in h_runs)
    ours, theirs = e_runs[0][2], h_runs[0][2]
    total = n * output_tokens
    return {"requests": n, "output_tokens": output_tokens, "rounds": rounds,
            "engine_s": e_wall, "hf_s": h_wall, "engine_cpu_s": e_cpu, "hf_cpu_s": h_cpu,
            "engine_tok_s": total / e_wall, "hf_tok_s": total / h_wall, "speedup": h_wall / e_wall,
            "speedup_cpu_time": h_cpu / e_cpu,
            "outputs_equal": sum(a == b for a, b in zip(ours, theirs)) / n}


def timed(fn, device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1000)
    return sorted(samples)[len(samples) // 2]


def step_rows(args, device: torch.device, dtype: torch.dtype, weight_bytes: int, kv_per_token: int) -> list[dict]:
    if device.type == "cpu":
        torch.set_num_threads(1)  # as a decode worker on the 2-core box runs (ELASTUNE_THREADS=1)
    model = build(args.shape, device, dtype)
    cfg = model.config
    bandwidth, peak = PEAKS[device.type]
    rows = []
    for batch in (1, 64):
        blocks_per_seq = blocks_for_tokens(args.context + 1, BLOCK_SIZE)
        cache = PagedKvCache(cfg, batch * blocks_per_seq, BLOCK_SIZE, dtype, device)
        work = [SeqWork([1], args.context, list(range(b * blocks_per_seq, (b + 1) * blocks_per_seq)), sample=True)
                for b in range(batch)]
        step_batch = build_batch(work, BLOCK_SIZE, device)
        ms = timed(lambda c=cache, sb=step_batch: model.forward_paged(sb, c), device)
        floor = (weight_bytes + batch * args.context * kv_per_token) / bandwidth * 1000
        rows.append({"case": f"decode step, batch {batch}, context {args.context}", "ms": ms, "floor_ms": floor,
                     "tokens_per_s": batch / ms * 1000})
        del cache

    n = args.prefill_tokens
    prompt = torch.randint(0, cfg.vocab_size, (1, n), device=device)
    ms = timed(lambda: model.prefill(prompt, torch.tensor([n], device=device)), device, warmup=2, iters=5)
    flops = 2 * (weight_bytes / torch.empty(0, dtype=dtype).element_size()) * n + 4 * cfg.num_layers * n * n * cfg.hidden_size / 2
    rows.append({"case": f"prefill, {n} tokens", "ms": ms, "floor_ms": flops / peak * 1000, "tokens_per_s": n / ms * 1000})

    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--concurrent", type=int, default=0, help="also run N requests through the engine vs HF (CPU, tiny)")
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--sizing-only", action="store_true", help="KV pool sizing without building the model")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig.from_dict({"model_type": "llama", "rms_norm_eps": 1e-5, **SHAPES[args.shape]})
    weight_bytes = bf16_weight_bytes(cfg) // 2 * torch.empty(0, dtype=dtype).element_size()
    kv_per_token = cfg.kv_bytes_per_token(torch.empty(0, dtype=dtype).element_size())
    rows = [] if args.sizing_only else step_rows(args, device, dtype, weight_bytes, kv_per_token)

    block_bytes = PagedKvCache.block_bytes(cfg, BLOCK_SIZE, torch.bfloat16)
    pool_blocks = blocks_for_budget(int((GPU_BYTES - bf16_weight_bytes(cfg)) * GPU_FRACTION), block_bytes)
    per_seq = blocks_for_tokens(2048, BLOCK_SIZE)
    result = {
        "machine": machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "commit": commit(), "shape": args.shape, "dtype": str(dtype),
        "load_average": os.getloadavg(),  # a shared box: wall-clock figures move with it
        "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token,
        "kv_pool_80GB": {"block_size": BLOCK_SIZE, "gpu_fraction": GPU_FRACTION, "blocks": pool_blocks,
                         "block_bytes_bf16": block_bytes, "max_2048_token_sequences": pool_blocks // per_seq,
                         "whole_context_slots": pool_blocks * BLOCK_SIZE // cfg.max_model_len},
        "rows": rows,
    }
    if args.concurrent:
        result["concurrent"] = concurrent_vs_hf(args.concurrent, args.output_tokens)
    print(f"\n{args.shape} {result['dtype']} on {result['device']}, torch {torch.__version__}, commit {result['commit']}")
    print(f"{'case':<40} {'measured ms':>12} {'floor ms':>9} {'tok/s':>10}")
    for r in rows:
        print(f"{r['case']:<40} {r['ms']:>12.2f} {r['floor_ms']:>9.2f} {r['tokens_per_s']:>10.0f}")
    pool = result["kv_pool_80GB"]
    print(f"KV per token {kv_per_token / 1024:.0f} KiB ({dtype}); block pool on an 80 GB GPU (bf16 weights, "
          f"{GPU_FRACTION:.0%} of the rest, {BLOCK_SIZE}-token blocks): {pool['blocks']} blocks = "
          f"{pool['max_2048_token_sequences']} concurrent 2,048-token sequences "
          f"({pool['whole_context_slots']} with whole-context slots of {cfg.max_model_len})")
    if args.concurrent:
        c = result["concurrent"]
        print(f"{c['requests']} concurrent requests x {c['output_tokens']} tokens, tiny model, 1 thread: engine "
              f"{c['engine_tok_s']:.0f} tok/s, transformers generate() sequential {c['hf_tok_s']:.0f} tok/s: "
              f"{c['speedup']:.1f}x wall clock, {c['speedup_cpu_time']:.1f}x in CPU time "
              f"(best of {c['rounds']} alternating runs; greedy outputs equal: {c['outputs_equal']:.0%})")
    write_json(Path(args.out) / f"engine-{args.shape}-{device.type}-{result['commit']}.json", result)



if __name__ == "__main__":
    main()
