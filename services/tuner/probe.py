"""One profiling process at one share: runs the stages' own step code and times it.

`python -m services.tuner.probe` reads a ProbeJob as JSON on stdin and writes one JSON line
per measured item on stdout. The profiler starts one such process per share, with the share's
environment (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE on a GPU, threads + CPU affinity on a CPU), so
what is measured is exactly what a worker at that share would see.

What runs is the workers' code: a prefill micro-batch is `ModelRunner.prefill` as the prefill
batcher calls it; a decode step is `DecodeEngine.step` (scheduler + model + sampler) with
`batch` sequences at the workload's context length; an experts call is the experts server's
own path (services/experts/micro_batch.py: cut into micro-batches, each piece through
mix_experts) on the model's expert weights, with seeded top-k routing. This is the only tuner
module that touches engine internals; when the engine changes, this is the file to follow it.
Figures: prefill latency is one micro-batch (ms), throughput prompt tokens/s; decode latency
is one step (ms, the inter-token latency at that batch), throughput output tokens/s; experts
latency is one expert micro-batch (ms the device is held, what a call queued behind waits at
most per piece), throughput routed tokens ((token, expert) pairs) per second over whole calls.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ProbeItem:
    stage: str  # "prefill" | "decode" | "experts"
    config: dict[str, int]  # experts: {"max_batch_size": routed tokens per expert micro-batch}
    workload: dict[str, int]  # prefill: {"prompt_len": n}; decode: {"context_len": n}; experts: {"call_tokens": n}


@dataclass(frozen=True)
class ProbeJob:
    model_dir: str
    device: str
    dtype: str
    share: float
    mechanism: str  # "cpu" | "mps"
    cores: tuple[int, ...] = ()
    items: tuple[ProbeItem, ...] = ()
    warmup: int = 1
    reps: int = 5

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> ProbeJob:
        data = json.loads(text)
        data["items"] = tuple(ProbeItem(**i) for i in data["items"])
        data["cores"] = tuple(data["cores"])
        return ProbeJob(**data)


@dataclass(frozen=True)
class Measurement:
    item: ProbeItem
    throughput_tokens_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    samples: int
    extra: dict = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


class _Sink:
    """A decode sequence's outbox during profiling: tokens are not delivered anywhere."""

    def put_nowait(self, item) -> None:
        pass


def _prefill(runner, item: ProbeItem, warmup: int, reps: int) -> Measurement:
    from ..common.types import SamplingParams

    batch, length = item.config["max_batch_size"], item.workload["prompt_len"]
    vocab = runner.config.vocab_size
    prompts = [[(7 + 31 * i + 13 * j) % vocab for j in range(length)] for i in range(batch)]
    params = [SamplingParams(max_tokens=1, temperature=0.0)] * batch
    times = []
    for rep in range(warmup + reps):
        start = time.perf_counter()
        runner.prefill(prompts, params, [0] * batch)
        if rep >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    mean_s = sum(times) / len(times) / 1000
    return Measurement(item, batch * length / mean_s, percentile(times, 50), percentile(times, 95), len(times))


def _decode(runner, item: ProbeItem, warmup: int, reps: int) -> Measurement:
    from ..common.types import SamplingParams
    from ..decode.engine import DecodeEngine
    from ..decode.sequence import Sequence
    from ..engine.kv_cache import PagedKvCache

    batch, context = item.config["max_batch_size"], item.workload["context_len"]
    cfg = runner.config
    needed = context + warmup + reps + 1
    if needed > cfg.max_model_len:
        raise ValueError(f"context_len {context} leaves no room in the model's {cfg.max_model_len}-token window")
    # A KV pool as large as this measurement needs, not the device's free memory: batch 64 of
    # an 8B model's 8k-token contexts would not fit next to its weights. The engine keeps a
    # 2% watermark free for growth, hence the margin.
    block = 16
    blocks = batch * -(-needed // block)
    budget = PagedKvCache.block_bytes(cfg, block, runner.dtype) * (blocks + blocks // 40 + 2)
    engine = DecodeEngine(runner, batch, batch, None, budget, block, token_budget=max(512, batch))
    params = SamplingParams(max_tokens=1 << 30, temperature=0.0, ignore_eos=True)
    seqs = []
    for i in range(batch):
        tokens = [(11 + 17 * i + 5 * j) % cfg.vocab_size for j in range(context)]
        seq = Sequence(f"probe-{i}", -1, tokens, context, params, 0, frozenset(), engine.max_seq_len, outbox=_Sink())
        if not engine.reserve(seq):
            raise RuntimeError(f"probe: no KV room for sequence {i} of {batch}")
        engine.add(seq)
        seqs.append(seq)
    while any(s.generated == 0 for s in seqs):  # the prompts are prefilled in the engine first
        engine.step()
    times = []
    for rep in range(warmup + reps):
        start = time.perf_counter()
        engine.step()
        if rep >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    mean_s = sum(times) / len(times) / 1000
    return Measurement(item, batch / mean_s, percentile(times, 50), percentile(times, 95), len(times))


def _experts_call(experts, top_k: int, routed: int):
    """A Forward call of `routed` routed tokens (routed // top_k tokens, top_k distinct experts
    each, drawn uniformly with a fixed seed) at layer 0, in host memory as the server parses it."""
    import torch

    from ..engine.moe_model import pairs
    from ..experts.wire import ExpertCall

    gen = torch.Generator().manual_seed(routed)
    n = max(1, routed // top_k)
    x = torch.randn(n, experts.hidden_size, generator=gen).to(experts.dtype)  # [N, H]
    scores = torch.rand(n, experts.num_experts, generator=gen)
    top = scores.topk(top_k, dim=-1)  # [N, K]
    token_index, expert_ids, weights = pairs(top.indices, torch.softmax(top.values, dim=-1))
    return ExpertCall(0, x, token_index, expert_ids, weights)


def _experts(moe, item: ProbeItem, warmup: int, reps: int) -> Measurement:
    from ..experts.micro_batch import assemble, compute, split

    experts, top_k, sync = moe
    micro_batch = item.config["max_batch_size"]
    call = _experts_call(experts, top_k, item.workload["call_tokens"])
    pairs = int(call.expert_ids.numel())
    steps, calls = [], []
    for rep in range(warmup + reps):
        started = time.perf_counter()
        pieces = split(call, micro_batch)
        outputs = []
        for piece in pieces:
            start = time.perf_counter()
            outputs.append(compute(piece.call, experts.get, experts.dtype, experts.device))
            sync()
            if rep >= warmup:
                steps.append((time.perf_counter() - start) * 1000)
        assemble(call, pieces, outputs)
        if rep >= warmup:
            calls.append(time.perf_counter() - started)
    return Measurement(item, pairs * len(calls) / sum(calls), percentile(steps, 50), percentile(steps, 95),
                       len(steps), {"pieces_per_call": len(pieces), "call_ms_mean": 1000 * sum(calls) / len(calls)})


def _load_experts(job: ProbeJob):
    """Every expert of the model on this device, the top-k, and a device sync for the timer."""
    import torch

    from ..engine.loader import resolve_dtype
    from ..engine.moe_config import MoeConfig
    from ..experts.weights import CheckpointExperts

    device = torch.device(job.device)
    experts = CheckpointExperts(job.model_dir, resolve_dtype(job.dtype, device), device)
    experts.load(list(range(experts.num_experts)))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return experts, MoeConfig.from_dir(job.model_dir).top_k, sync


def run(job: ProbeJob, emit=print) -> None:
    from .shares import ShareMechanism

    import torch

    if job.mechanism == "cpu":
        ShareMechanism("cpu", job.cores).apply_in_process(job.share)
    runner = moe = None  # loaded on first use: an experts-only job needs no whole model
    with torch.inference_mode():
        for item in job.items:
            if item.stage == "experts":
                moe = moe or _load_experts(job)
                m = _experts(moe, item, job.warmup, job.reps)
            else:
                if runner is None:
                    from ..engine.runner import ModelRunner

                    runner = ModelRunner(job.model_dir, job.dtype, job.device, torch.get_num_threads())
                measure = _prefill if item.stage == "prefill" else _decode
                m = measure(runner, item, job.warmup, job.reps)
            if job.device.startswith("cuda"):
                torch.cuda.synchronize()
            emit(json.dumps(asdict(m)))


def main() -> int:
    job = ProbeJob.from_json(sys.stdin.read())
    run(job, emit=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
