"""A tiny, deterministic Mixtral-architecture model: `elastune model create tiny-moe`.

It is the dense tiny model's directory (services/engine/tiny.py: same tokenizer files, byte for
byte) with every MLP replaced by a sparse MoE block of 8 experts, top-2 routing, written in the
per-expert layout of the original Mixtral checkpoints, which transformers 5 loads too
(`MixtralForCausalLM`). Two calls give byte-identical files.

The router's init gives logits a spread of a few units, so the top-2 choice has no near-ties
that batched and unbatched arithmetic could flip.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

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


def _weights(shape: dict) -> dict[str, torch.Tensor]:
    """Seeded float32 weights under Mixtral's per-expert names; same scales as the dense tiny model."""
    gen = torch.Generator().manual_seed(tiny.SEED + 1)
    hidden, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    experts = shape["num_local_experts"]
    head_dim = hidden // shape["num_attention_heads"]
    q_out = shape["num_attention_heads"] * head_dim
    kv_out = shape["num_key_value_heads"] * head_dim
    residual_std = tiny.RESIDUAL_SCALE / (2 * layers) ** 0.5

    def normal(rows: int, cols: int, std: float) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen, dtype=torch.float32) * std).contiguous()

    weights = {"model.embed_tokens.weight": normal(shape["vocab_size"], hidden, tiny.EMBED_STD)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = torch.ones(hidden)
        weights[p + "self_attn.q_proj.weight"] = normal(q_out, hidden, hidden**-0.5)
        weights[p + "self_attn.k_proj.weight"] = normal(kv_out, hidden, hidden**-0.5)
        weights[p + "self_attn.v_proj.weight"] = normal(kv_out, hidden, hidden**-0.5)
        weights[p + "self_attn.o_proj.weight"] = normal(hidden, q_out, residual_std * q_out**-0.5)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        moe = p + "block_sparse_moe."
        weights[moe + "gate.weight"] = normal(experts, hidden, ROUTER_LOGIT_STD * hidden**-0.5)
        for e in range(experts):
            weights[f"{moe}experts.{e}.w1.weight"] = normal(inter, hidden, hidden**-0.5)
            weights[f"{moe}experts.{e}.w3.weight"] = normal(inter, hidden, hidden**-0.5)
            weights[f"{moe}experts.{e}.w2.weight"] = normal(hidden, inter, residual_std * inter**-0.5)
    weights["model.norm.weight"] = torch.ones(hidden)
    weights["lm_head.weight"] = normal(shape["vocab_size"], hidden, tiny.LM_HEAD_LOGIT_STD * hidden**-0.5)
    return weights


def create_tiny_moe_model(out_dir: str | Path) -> Path:
    """Write the tiny MoE model into out_dir and return it; config.json last marks it finished."""
    out = Path(out_dir)
    tiny.create_tiny_model(out)  # tokenizer and generation config; weights and config replaced below
    (out / "config.json").unlink()
    save_file(_weights(MOE_SHAPE), str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)
    tiny._write_json(out / "config.json", _config(MOE_SHAPE))
    return out


def default_moe_model_dir() -> Path:
    return tiny.default_model_dir().parent / "tiny-moe"


def ensure_tiny_moe_model(path: str | Path | None = None) -> Path:
    """A directory holding the tiny MoE model, built beside it and renamed into place if missing."""
    target = Path(path).expanduser() if path is not None else default_moe_model_dir()
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)
        create_tiny_moe_model(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
