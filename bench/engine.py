"""Engine benchmark: decode step and prefill time of the serving model code beside the floor.

Builds a model of a given shape with fixed-seed random weights directly on the device (no
files), then times the decode step (batch 1 and 64, context 512) and a 2,048-token prefill
with CUDA events (wall clock on CPU), and prints each beside its floor: bytes the step must
read at the device's memory bandwidth, or FLOPs at its matmul peak. Writes JSON with the
machine, device and commit.

    python bench/engine.py --shape llama3-8b --device cuda      # the issue's GPU figures
    python bench/engine.py --shape tiny --device cpu             # a quick check anywhere
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.engine.kv_cache import KvCache  # noqa: E402
from services.engine.model import CausalLM  # noqa: E402
from services.engine.model_config import ModelConfig  # noqa: E402
from bench.meta import commit, machine  # noqa: E402

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0),
    "tiny": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=4096, max_position_embeddings=2048, rope_theta=10000.0),
}
# Reference peaks for the floor (DESIGN.md section 8): H100 device copy ~3.0 TB/s, bf16 matmul ~800 TFLOP/s.
PEAKS = {"cuda": (3.0e12, 800e12), "cpu": (20e9, 40e9)}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(args.shape, device, dtype)
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = cfg.kv_bytes_per_token(torch.empty(0, dtype=dtype).element_size())
    bandwidth, peak = PEAKS[device.type]
    rows = []

    for batch in (1, 64):
        cache = KvCache(cfg, batch, args.context + 8, dtype, device)
        tokens = torch.randint(0, cfg.vocab_size, (batch,), device=device)
        positions = torch.full((batch,), args.context, device=device)
        slots = torch.arange(batch, device=device)
        ms = timed(lambda c=cache: model.decode(tokens, positions, slots, c, (0, batch), args.context + 1), device)
        floor = (weight_bytes + batch * args.context * kv_per_token) / bandwidth * 1000
        rows.append({"case": f"decode step, batch {batch}, context {args.context}", "ms": ms, "floor_ms": floor,
                     "tokens_per_s": batch / ms * 1000})
        del cache

    n = args.prefill_tokens
    prompt = torch.randint(0, cfg.vocab_size, (1, n), device=device)
    ms = timed(lambda: model.prefill(prompt, torch.tensor([n], device=device)), device, warmup=2, iters=5)
    flops = 2 * (weight_bytes / torch.empty(0, dtype=dtype).element_size()) * n + 4 * cfg.num_layers * n * n * cfg.hidden_size / 2
    rows.append({"case": f"prefill, {n} tokens", "ms": ms, "floor_ms": flops / peak * 1000, "tokens_per_s": n / ms * 1000})

    free = 80e9 - weight_bytes
    result = {
        "machine": machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "commit": commit(), "shape": args.shape, "dtype": str(dtype),
        "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token,
        "max_2048_token_sequences_on_80GB_slots": int(free // (cfg.max_model_len * kv_per_token)),
        "max_2048_token_sequences_on_80GB_paged": int(free // (2048 * kv_per_token)),
        "rows": rows,
    }
    print(f"\n{args.shape} {result['dtype']} on {result['device']}, torch {torch.__version__}, commit {result['commit']}")
    print(f"{'case':<40} {'measured ms':>12} {'floor ms':>9} {'tok/s':>10}")
    for r in rows:
        print(f"{r['case']:<40} {r['ms']:>12.2f} {r['floor_ms']:>9.2f} {r['tokens_per_s']:>10.0f}")
    print(f"KV per token {kv_per_token / 1024:.0f} KiB; concurrent 2,048-token sequences in 80 GB: "
          f"{result['max_2048_token_sequences_on_80GB_paged']} if KV held only its tokens, "
          f"{result['max_2048_token_sequences_on_80GB_slots']} with today's whole-context slots")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine-{args.shape}-{device.type}-{result['commit']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")



if __name__ == "__main__":
    main()
