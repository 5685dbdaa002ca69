"""KV storage of a decode worker: one fixed-size slot per running sequence.

Slot bookkeeping is pure Python (`SlotPool`); the tensors live in `KvCache`. The engine
issue replaces slots with paged blocks behind the same two seams.
"""

from __future__ import annotations

import threading

import torch

from .model_config import ModelConfig


class SlotPool:
    """Which slots are free. Thread-safe: the event loop reserves, the engine thread frees."""

    def __init__(self, num_slots: int, slot_tokens: int):
        self.num_slots = num_slots
        self.slot_tokens = slot_tokens
        self._free = list(range(num_slots - 1, -1, -1))
        self._lock = threading.Lock()

    def allocate(self) -> int | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        with self._lock:
            if slot in self._free or not 0 <= slot < self.num_slots:
                raise ValueError(f"slot {slot} is not allocated")
            self._free.append(slot)

    @property
    def used(self) -> int:
        return self.num_slots - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_slots * self.slot_tokens


class KvCache:
    """k[layer], v[layer]: [slots, KVH, slot_tokens, D]."""

    def __init__(self, config: ModelConfig, num_slots: int, slot_tokens: int, dtype: torch.dtype, device: torch.device):
        shape = (num_slots, config.num_kv_heads, slot_tokens, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.dtype = dtype

    def write_prompt(self, slot: int, layer: int, kv: torch.Tensor) -> None:
        """kv [2, KVH, T, D]: a prompt's K/V for one layer, placed at positions 0..T-1."""
        t = kv.shape[2]
        self.k[layer][slot, :, :t].copy_(kv[0])
        self.v[layer][slot, :, :t].copy_(kv[1])
