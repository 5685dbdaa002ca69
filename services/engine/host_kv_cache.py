"""The host swap space's tensors: KV blocks of swapped-out sequences (bookkeeping in
`swap_space.SwapSpace`).

Same block layout as `PagedKvCache`, so a swap is a gather of whole blocks on one side and a
scatter on the other, per layer. Beside a GPU pool the blocks are pinned, so the copies run
at the DMA engine's rate; beside a CPU pool it is a second pool in RAM and a swap is a real
copy (it frees the pool's blocks for other sequences just the same).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .kv_cache import PagedKvCache
from .model_config import ModelConfig


class HostKvCache:
    """k[layer], v[layer]: [num_blocks, block_size, KVH, D] on the host."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, pin: bool):
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, pin_memory=pin) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, pin_memory=pin) for _ in range(config.num_layers)]
        self.num_blocks = num_blocks

    def swap_out(self, cache: PagedKvCache, device_blocks: Sequence[int], host_blocks: Sequence[int]) -> None:
        """Copy device blocks into host blocks (before the step that may reuse the device blocks)."""
        src = torch.tensor(device_blocks, dtype=torch.long, device=cache.device)
        dst = torch.tensor(host_blocks, dtype=torch.long)
        for pool, host in zip(cache.k + cache.v, self.k + self.v):
            # blocking copy: the host blocks must hold the data before the scheduler may hand
            # them to another swap; an async copy on a side stream is a GPU follow-up
            host.index_copy_(0, dst, pool.index_select(0, src).to("cpu"))  # [n, block_size, KVH, D]

    def swap_in(self, cache: PagedKvCache, host_blocks: Sequence[int], device_blocks: Sequence[int]) -> None:
        """Copy host blocks into (freshly allocated) device blocks."""
        src = torch.tensor(host_blocks, dtype=torch.long)
        dst = torch.tensor(device_blocks, dtype=torch.long, device=cache.device)
        for pool, host in zip(cache.k + cache.v, self.k + self.v):
            pool.index_copy_(0, dst, host.index_select(0, src).to(cache.device, non_blocking=True))
