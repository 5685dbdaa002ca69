"""Where an experts server gets expert FFN weights: a Mixtral checkpoint, or seeded synthetic ones.

Both load lazily per (layer, expert) and keep what they loaded: a server preloads its group's
experts, and when a placement update sends it another expert, that expert is read on first use
instead of the call failing.
"""

from __future__ import annotations

import threading

import torch

from ..engine.moe_config import MoeConfig
from ..engine.moe_weights import read_experts

Pair = tuple[torch.Tensor, torch.Tensor]  # gate_up [2I, H], down [H, I]


class CheckpointExperts:
    def __init__(self, model_dir: str, dtype: torch.dtype, device: torch.device):
        config = MoeConfig.from_dir(model_dir)
        self.model_dir = model_dir
        self.num_layers = config.num_layers
        self.num_experts = config.num_experts
        self.hidden_size = config.hidden_size
        self.dtype, self.device = dtype, device
        self._loaded: dict[tuple[int, int], Pair] = {}
        self._lock = threading.Lock()

    def load(self, experts: list[int]) -> None:
        """Read these experts of every layer (one pass over the checkpoint)."""
        missing = [e for e in experts if any((l, e) not in self._loaded for l in range(self.num_layers))]
        if not missing:
            return
        found = read_experts(self.model_dir, range(self.num_layers), missing)
        with self._lock:
            for key, (gate_up, down) in found.items():
                self._loaded[key] = (gate_up.to(self.device, self.dtype), down.to(self.device, self.dtype))

    def get(self, layer: int, expert: int) -> Pair:
        pair = self._loaded.get((layer, expert))
        if pair is None:
            self.load([expert])
            pair = self._loaded[(layer, expert)]
        return pair

    @property
    def loaded_experts(self) -> set[int]:
        return {e for _, e in self._loaded}


class SyntheticExperts:
    """Seeded random FFNs: expert e of layer l is the same on every server (seed from l and e)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 device: torch.device, num_layers: int = 1024):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.dtype, self.device = dtype, device
        self._loaded: dict[tuple[int, int], Pair] = {}

    def load(self, experts: list[int]) -> None:
        """Synthetic weights are made on first use; nothing to preload per layer count."""

    def get(self, layer: int, expert: int) -> Pair:
        pair = self._loaded.get((layer, expert))
        if pair is None:
            gen = torch.Generator().manual_seed(1_000_003 * layer + expert)
            h, i = self.hidden_size, self.intermediate_size
            gate_up = torch.randn(2 * i, h, generator=gen) * h**-0.5
            down = torch.randn(h, i, generator=gen) * i**-0.5
            pair = self._loaded[(layer, expert)] = (gate_up.to(self.device, self.dtype), down.to(self.device, self.dtype))
        return pair

    @property
    def loaded_experts(self) -> set[int]:
        return {e for _, e in self._loaded}
