"""Synthetic expert load: study expert scaling with a dense model (no MoE checkpoint needed).

Every dense MLP is wrapped so that, besides its own output, a share of the step's tokens
(`synthetic_ratio`) is routed to `synthetic_top_k` of `synthetic_experts` experts drawn from a
Zipf distribution with exponent `synthetic_zipf_s` (0: uniform; expert 0 is the hottest) and
sent to the experts service like a real MoE layer's tokens. The experts' results are discarded,
so the model's outputs are exactly the dense model's; the experts service sees real traffic
(run its servers with ELASTUNE_SYNTHETIC_EXPERTS set to the same count).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ExpertsClientConfig


def zipf_probs(num_experts: int, s: float) -> torch.Tensor:
    """P(expert e) proportional to (e + 1) ** -s; [E]."""
    weights = torch.arange(1, num_experts + 1, dtype=torch.float64) ** -s
    return (weights / weights.sum()).float()


class ZipfRouter:
    """Seeded synthetic routing: distinct top-k experts per token, equal weights."""

    def __init__(self, num_experts: int, top_k: int, s: float, seed: int):
        self.probs = zipf_probs(num_experts, s)
        self.top_k = top_k
        self.gen = torch.Generator().manual_seed(seed)

    def route(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> expert ids [n, K], weights [n, K]."""
        ids = torch.multinomial(self.probs.expand(n, -1), self.top_k, replacement=False, generator=self.gen)
        return ids, torch.full((n, self.top_k), 1.0 / self.top_k)


class SyntheticExpertLoad(nn.Module):
    def __init__(self, mlp: nn.Module, layer: int, backend, router: ZipfRouter, ratio: float):
        super().__init__()
        self.mlp = mlp
        self.layer = layer
        self.backend = backend
        self.router = router
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        flat = x.reshape(-1, x.shape[-1])  # [N, H]
        n = round(flat.shape[0] * self.ratio)
        if n:
            self.backend.forward(self.layer, flat[:n], *self.router.route(n))
        return out


def add_synthetic_load(model, backend, config: ExpertsClientConfig) -> None:
    """Wrap every layer's MLP of a dense `CausalLM` (in place)."""
    router = ZipfRouter(config.synthetic_experts, config.synthetic_top_k, config.synthetic_zipf_s, config.synthetic_seed)
    for i, layer in enumerate(model.layers):
        layer.mlp = SyntheticExpertLoad(layer.mlp, i, backend, router, config.synthetic_ratio)
