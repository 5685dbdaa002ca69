"""Load a local Hugging Face model directory (safetensors) into `CausalLM`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .model import CausalLM
from .model_config import ModelConfig
from .moe_config import is_moe_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": float32 on CPU (bf16 matmuls are slow there), bfloat16 on GPU."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}")
    return files


def _read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name.removeprefix("model.")] = f.get_tensor(name)
    return tensors


def backbone_state(config: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything but the MLPs, under CausalLM's names: embeddings, final norm, lm_head, and each
    layer's attention (q/k/v fused, with the biases the config asks for) and norms.

    Dense and MoE models share it; each adds its own MLP weights per layer.
    """
    state = {
        "embed_tokens.weight": hf["embed_tokens.weight"],
        "norm.weight": hf["norm.weight"],
        "lm_head.weight": hf.get("lm_head.weight", hf["embed_tokens.weight"]),
    }
    for i in range(config.num_layers):
        p = f"layers.{i}."
        attn = p + "self_attn."
        state[attn + "qkv_proj.weight"] = torch.cat([hf[f"{attn}{n}_proj.weight"] for n in "qkv"])
        if config.qkv_bias:
            state[attn + "qkv_proj.bias"] = torch.cat([hf[f"{attn}{n}_proj.bias"] for n in "qkv"])
        state[attn + "o_proj.weight"] = hf[attn + "o_proj.weight"]
        if config.o_bias:
            state[attn + "o_proj.bias"] = hf[attn + "o_proj.bias"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{p}{norm}.weight"] = hf[f"{p}{norm}.weight"]
    return state


def _fused_state(config: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map HF names onto CausalLM's, concatenating q/k/v and gate/up."""
    state = backbone_state(config, hf)
    for i in range(config.num_layers):
        mlp = f"layers.{i}.mlp."
        state[mlp + "gate_up_proj.weight"] = torch.cat([hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"]])
        state[mlp + "down_proj.weight"] = hf[mlp + "down_proj.weight"]
    return state


def build_model(model: CausalLM, state: dict[str, torch.Tensor], dtype: str, device: str) -> CausalLM:
    """Give a model built on the meta device its weights, then move it to `device` in `dtype`."""
    dev = torch.device(device)
    model.load_state_dict(state, assign=True, strict=True)
    model = model.to(device=dev, dtype=resolve_dtype(dtype, dev)).eval()
    model.set_rope_tables(dev, model.embed_tokens.weight.dtype)
    return model


def load_model(model_dir: str | Path, dtype: str = "auto", device: str = "cpu") -> CausalLM:
    model_dir = Path(model_dir)
    if is_moe_dir(model_dir):  # MoE models are their own module (moe_model.py), same interface
        from .moe_model import load_moe_model

        return load_moe_model(model_dir, dtype, device)
    config = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):  # no memory for weights that are overwritten at once
        model = CausalLM(config)
    return build_model(model, _fused_state(config, _read_tensors(model_dir)), dtype, device)
