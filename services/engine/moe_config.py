"""The shape of a mixture-of-experts model (Mixtral family) read from a Hugging Face `config.json`.

Attention, norms and RoPE are the dense model's (a Mixtral layer is a Mistral layer whose MLP is
a sparse MoE block), so `MoeConfig` is a `ModelConfig` plus the expert counts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .model_config import ModelConfig

MOE_MODEL_TYPES = ("mixtral",)


@dataclass(frozen=True)
class MoeConfig(ModelConfig):
    num_experts: int
    top_k: int

    @classmethod
    def from_dict(cls, raw: dict) -> "MoeConfig":
        model_type = raw.get("model_type", "")
        if model_type not in MOE_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not a supported MoE model; supported: {', '.join(MOE_MODEL_TYPES)}"
            )
        # Mixtral attention is Mistral attention (no biases), so the dense parser reads it.
        dense = ModelConfig.from_dict({**raw, "model_type": "mistral"})
        num_experts = int(raw["num_local_experts"])
        top_k = int(raw["num_experts_per_tok"])
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..num_local_experts ({num_experts}), got {top_k}")
        return cls(**{**asdict(dense), "model_type": model_type}, num_experts=num_experts, top_k=top_k)


def is_moe_dir(model_dir: str | Path) -> bool:
    """Whether a model directory holds an MoE model this engine runs."""
    path = Path(model_dir) / "config.json"
    return path.is_file() and json.loads(path.read_text()).get("model_type") in MOE_MODEL_TYPES
