"""A tiny, deterministic Mixtral-architecture model: `elastune model create tiny-moe`.

It is the dense tiny model's directory (services/engine/tiny.py: same tokenizer files, byte for
byte) with every MLP replaced by a sparse MoE block of 8 experts, top-2 routing, written in the
per-expert layout of the original Mixtral checkpoints, which transformers 5 loads too
(`MixtralForCausalLM`). Two calls give byte-identical files.

The router's init gives logits a spread of a few units, so the top-2 choice has no near-ties
that batched and unbatched arithmetic could flip.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import tiny

MOE_SHAPE = {**tiny.TINY_SHAPE, "intermediate_size": 256, "num_local_experts": 8, "num_experts_per_tok": 2}
ROUTER_LOGIT_STD = 2.0


def _config(shape: dict) -> dict:
    dense = tiny._config(shape)
    for key in ("mlp_bias", "pretraining_tp", "attention_bias"):
        dense.pop(key)
    return {
        **dense,
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": shape["num_local_experts"],
        "num_experts_per_tok": shape["num_experts_per_tok"],
        "output_router_logits": False,
        "router_aux_loss_coef": 0.0,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
    }


def _moe_mlp(p: str, shape: dict, normal: tiny.Normal, residual_std: float) -> dict[str, torch.Tensor]:
    """One layer's router and experts under Mixtral's per-expert names; same scales as the dense MLP."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    moe = p + "block_sparse_moe."
    weights = {moe + "gate.weight": normal(shape["num_local_experts"], hidden, ROUTER_LOGIT_STD * hidden**-0.5)}
    for e in range(shape["num_local_experts"]):
        weights[f"{moe}experts.{e}.w1.weight"] = normal(inter, hidden, hidden**-0.5)
        weights[f"{moe}experts.{e}.w3.weight"] = normal(inter, hidden, hidden**-0.5)
        weights[f"{moe}experts.{e}.w2.weight"] = normal(hidden, inter, residual_std * inter**-0.5)
    return weights


def create_tiny_moe_model(out_dir: str | Path) -> Path:
    """Write the tiny MoE model into out_dir and return it; config.json last marks it finished."""
    # Its own seed: the attention weights differ from the dense tiny model's.
    return tiny.write_model_dir(out_dir, _config(MOE_SHAPE), tiny.seeded_weights(MOE_SHAPE, tiny.SEED + 1, _moe_mlp))


def default_moe_model_dir() -> Path:
    return tiny.default_model_dir().parent / "tiny-moe"


def ensure_tiny_moe_model(path: str | Path | None = None) -> Path:
    """A directory holding the tiny MoE model, built beside it and renamed into place if missing."""
    target = Path(path).expanduser() if path is not None else default_moe_model_dir()
    return tiny.ensure_model_dir(target, create_tiny_moe_model)
