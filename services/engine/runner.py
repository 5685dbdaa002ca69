"""A loaded model plus the batch plumbing both worker kinds need."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common.types import SamplingParams
from .batch import SeqWork, build_batch
from .kv_cache import PagedKvCache
from .loader import load_model
from .model_config import ModelConfig
from .sampler import sample


@dataclass
class PrefillOutput:
    first_token: int
    kv: list[torch.Tensor]  # per layer [2, KVH, T, D], T = prompt length


class ModelRunner:
    def __init__(self, model_dir: str | Path, dtype: str = "auto", device: str = "cpu", threads: int = 0):
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = load_model(model_dir, dtype=dtype, device=device)
        self.config: ModelConfig = self.model.config
        self.dtype = self.model.embed_tokens.weight.dtype

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        offsets: Sequence[int] | None = None,
        on_layer: Callable[[int, list[torch.Tensor]], None] | None = None,
    ) -> list[PrefillOutput]:
        """Run prompts as one right-padded micro-batch; sample each prompt's next token, which is
        output token offsets[i] of its request (0 unless a request resumes elsewhere).

        on_layer(i, kv), if given, gets layer i's KV for every prompt (kv[p] [2, KVH, n_p, D])
        while later layers are still computing; it runs on this (the model) thread.
        """
        lengths = [len(p) for p in prompts]
        tokens = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        per_layer: list[list[torch.Tensor]] = []  # [layer][prompt] -> [2, KVH, n, D]

        def split(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            # contiguous per prompt so it can be shipped as raw bytes
            per_layer.append([torch.stack((k[i, :, :n], v[i, :, :n])) for i, n in enumerate(lengths)])
            if on_layer is not None:
                on_layer(layer, per_layer[-1])

        logits, _ = self.model.prefill(tokens.to(self.device), torch.tensor(lengths, device=self.device), split)
        first = sample(logits, params, seeds, list(offsets) if offsets is not None else [0] * len(prompts))
        return [PrefillOutput(first[i], [kv[i] for kv in per_layer]) for i in range(len(prompts))]

    def execute(self, work: Sequence[SeqWork], cache: PagedKvCache) -> list[int | None]:
        """One engine step over the paged cache: the next token of every item that samples
        (None for a prefill chunk that does not reach its sequence's last token)."""
        batch = build_batch(list(work), cache.block_size, self.device)
        logits = self.model.forward_paged(batch, cache)  # [R, V], R = items that sample
        out: list[int | None] = [None] * len(work)
        if batch.sampled:
            items = [work[i] for i in batch.sampled]
            tokens = sample(logits, [w.params for w in items], [w.seed for w in items], [w.sample_index for w in items])
            for i, t in zip(batch.sampled, tokens):
                out[i] = t
        return out
