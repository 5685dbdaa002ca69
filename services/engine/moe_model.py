"""Mixture-of-experts decoder (Mixtral family): the dense model with each MLP a sparse MoE block.

Attention, RMSNorm, RoPE and the prefill/decode entry points are `CausalLM`'s; only the MLP of
every layer differs. A `MoeBlock` routes each token to its top-k experts and hands the routed
tokens to an expert backend:
- colocated (default): `LocalExperts`, every expert's weights inside this worker;
- disaggregated: any object with `forward(layer, x, expert_ids, weights)`, e.g.
  `services.experts.client.RemoteExperts`, which ships the step's tokens to the experts service.
Both see the whole step at once (every token of the batch), so a remote backend makes one call
per expert group per MoE layer per step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .loader import _read_tensors, backbone_state, build_model
from .model import CausalLM
from .moe_config import MoeConfig
from .moe_weights import router_weight, stacked_experts

ExpertWeights = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # expert -> (gate_up [2I, H], down [H, I])


class ExpertBackend(Protocol):
    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], expert_ids and weights [N, K] -> sum_k weights[:, k] * expert_k(x) [N, H]."""
        ...


def mix_experts(
    x: torch.Tensor, token_index: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, expert: ExpertWeights
) -> torch.Tensor:
    """The weighted sum of expert outputs per token, over (token, expert, weight) pairs.

    x [N, H]; token_index, expert_ids, weights [P]. Experts run in ascending id order, one
    matmul pair per expert over all its tokens, as transformers does (same summation order).
    """
    out = torch.zeros_like(x)
    for e in torch.unique(expert_ids).tolist():
        pick = (expert_ids == e).nonzero()[:, 0]  # [p]
        rows = token_index[pick]
        gate_up, down = expert(e)
        gate, up = F.linear(x[rows], gate_up).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down) * weights[pick, None].to(x.dtype)  # [p, H]
        out.index_add_(0, rows, y)
    return out


def pairs(expert_ids: torch.Tensor, weights: torch.Tensor):
    """[N, K] routing -> flat (token_index, expert_ids, weights), each [N * K]."""
    n, k = expert_ids.shape
    token_index = torch.arange(n, device=expert_ids.device).repeat_interleave(k)
    return token_index, expert_ids.reshape(-1), weights.reshape(-1)


class LocalExperts(nn.Module):
    """Every expert of one layer, stacked as transformers 5 stores them."""

    def __init__(self, config: MoeConfig):
        super().__init__()
        h, i, e = config.hidden_size, config.intermediate_size, config.num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def weights_of(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up_proj[e], self.down_proj[e]

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return mix_experts(x, *pairs(expert_ids, weights), self.weights_of)


class MoeBlock(nn.Module):
    """Router plus experts; called as the layer's `mlp` with x [B, T, H]."""

    def __init__(self, config: MoeConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.top_k = config.top_k
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = LocalExperts(config)
        self.remote: ExpertBackend | None = None  # set: disaggregated experts
        self.valid: torch.Tensor | None = None  # [B * T] bool during a padded prefill

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> expert ids [N, K], weights [N, K] (float32, renormalised over the top k)."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # softmax in fp32 as Mixtral does
        top, ids = torch.topk(probs, self.top_k, dim=-1)
        return ids, top / top.sum(dim=-1, keepdim=True)

    @property
    def backend(self) -> ExpertBackend:
        return self.remote if self.remote is not None else self.experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, H]
        if self.valid is not None and self.valid.shape[0] == flat.shape[0] and not bool(self.valid.all()):
            # Padding positions of a prefill batch go to no expert: less traffic, honest counters.
            out = torch.zeros_like(flat)
            rows = self.valid.nonzero()[:, 0]
            real = flat[rows]
            out[rows] = self.backend.forward(self.layer, real, *self.route(real))
            return out.view_as(x)
        return self.backend.forward(self.layer, flat, *self.route(flat)).view_as(x)


class MoeCausalLM(CausalLM):
    """`CausalLM` whose layers' MLPs are `MoeBlock`s; same prefill/decode interface."""

    def __init__(self, config: MoeConfig):
        super().__init__(config)
        for i, layer in enumerate(self.layers):
            layer.mlp = MoeBlock(config, i)

    @property
    def moe_blocks(self) -> list[MoeBlock]:
        return [layer.mlp for layer in self.layers]

    def use_experts(self, backend: ExpertBackend | None) -> None:
        """Send routed tokens to `backend` (None: back to the colocated experts)."""
        for block in self.moe_blocks:
            block.remote = backend

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, on_layer=None):
        b, t = tokens.shape
        valid = (torch.arange(t, device=tokens.device)[None, :] < lengths[:, None]).reshape(-1)  # [B * T]
        for block in self.moe_blocks:
            block.valid = valid
        try:
            return super().prefill(tokens, lengths, on_layer)
        finally:
            for block in self.moe_blocks:
                block.valid = None


def _moe_state(config: MoeConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map HF names onto MoeCausalLM's: the dense backbone, then each layer's router and stacked experts."""
    state = backbone_state(config, hf)
    for i in range(config.num_layers):
        mlp = f"layers.{i}.mlp."
        state[mlp + "gate.weight"] = router_weight(hf, i)
        gate_up, down = stacked_experts(hf, i, config.num_experts)
        state[mlp + "experts.gate_up_proj"] = gate_up
        state[mlp + "experts.down_proj"] = down
    return state


def load_moe_model(model_dir: str | Path, dtype: str = "auto", device: str = "cpu") -> MoeCausalLM:
    model_dir = Path(model_dir)
    config = MoeConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = MoeCausalLM(config)
    return build_model(model, _moe_state(config, _read_tensors(model_dir)), dtype, device)
