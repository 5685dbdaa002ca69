"""One profiling process at one share: runs the stages' own step code and times it.

`python -m services.tuner.probe` reads a ProbeJob as JSON on stdin and writes one JSON line
per measured item on stdout. The profiler starts one such process per share, with the share's
environment (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE on a GPU, threads + CPU affinity on a CPU), so
what is measured is exactly what a worker at that share would see.

What runs is the workers' code: a prefill micro-batch is `ModelRunner.prefill` as the prefill
batcher calls it; a decode step is `DecodeEngine.step` (scheduler + model + sampler) with
`batch` sequences at the workload's context length. This is the only tuner module that touches
engine internals; when the engine changes, this is the file to follow it.
Figures: prefill latency is one micro-batch (ms), throughput prompt tokens/s; decode latency
is one step (ms, the inter-token latency at that batch), throughput output tokens/s.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ProbeItem:
    stage: str  # "prefill" | "decode"
    config: dict[str, int]
    workload: dict[str, int]  # prefill: {"prompt_len": n}; decode: {"context_len": n}


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


def run(job: ProbeJob, emit=print) -> None:
    from ..engine.runner import ModelRunner
    from .shares import ShareMechanism

    import torch

    if job.mechanism == "cpu":
        ShareMechanism("cpu", job.cores).apply_in_process(job.share)
    runner = ModelRunner(job.model_dir, job.dtype, job.device, torch.get_num_threads())
    with torch.inference_mode():
        for item in job.items:
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
