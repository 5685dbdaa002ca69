"""Where a Mixtral checkpoint keeps its expert weights, in either of the two layouts on the Hub.

- per expert (the original Mixtral release, and what `elastune model create tiny-moe` writes):
  `layers.{l}.block_sparse_moe.experts.{e}.w1|w3|w2.weight` (gate, up, down) and
  `layers.{l}.block_sparse_moe.gate.weight` (the router);
- fused (transformers 5's own layout): `layers.{l}.mlp.experts.gate_up_proj` [E, 2I, H],
  `layers.{l}.mlp.experts.down_proj` [E, H, I] and `layers.{l}.mlp.gate.weight`.

Names here are without the leading `model.`. An experts server reads only the experts it serves.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from .loader import weight_files


def _legacy(layer: int) -> str:
    return f"layers.{layer}.block_sparse_moe."


def _fused(layer: int) -> str:
    return f"layers.{layer}.mlp."


def router_weight(hf: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """The router of one layer, [E, H]."""
    return hf.get(_legacy(layer) + "gate.weight", hf.get(_fused(layer) + "gate.weight"))


def stacked_experts(hf: dict[str, torch.Tensor], layer: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All experts of one layer: gate_up [E, 2I, H] (gate rows first), down [E, H, I]."""
    fused = _fused(layer) + "experts."
    if fused + "gate_up_proj" in hf:
        return hf[fused + "gate_up_proj"], hf[fused + "down_proj"]
    p = _legacy(layer) + "experts."
    gate_up = torch.stack([torch.cat([hf[f"{p}{e}.w1.weight"], hf[f"{p}{e}.w3.weight"]]) for e in range(num_experts)])
    down = torch.stack([hf[f"{p}{e}.w2.weight"] for e in range(num_experts)])
    return gate_up, down


def read_experts(
    model_dir: str | Path, layers: Iterable[int], experts: Iterable[int]
) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, expert) -> (gate_up [2I, H], down [H, I]) for just the experts asked for."""
    want = {(l, e) for l in layers for e in experts}
    found: dict[tuple[int, int], dict[str, torch.Tensor]] = {key: {} for key in want}
    for path in weight_files(Path(model_dir)):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                short = name.removeprefix("model.")
                parts = short.split(".")
                if len(parts) < 4 or parts[0] != "layers":
                    continue
                layer = int(parts[1])
                if short.endswith("mlp.experts.gate_up_proj") or short.endswith("mlp.experts.down_proj"):
                    kind = "gate_up" if short.endswith("gate_up_proj") else "down"
                    stacked = f.get_slice(name)
                    for l, e in want:
                        if l == layer:
                            found[(l, e)][kind] = stacked[e : e + 1][0]
                elif parts[2] == "block_sparse_moe" and parts[3] == "experts":
                    key = (layer, int(parts[4]))
                    if key in found:
                        found[key][parts[5]] = f.get_tensor(name)
    out = {}
    for key, parts in found.items():
        if "gate_up" in parts:
            out[key] = (parts["gate_up"].contiguous(), parts["down"].contiguous())
        elif {"w1", "w2", "w3"} <= parts.keys():
            out[key] = (torch.cat([parts["w1"], parts["w3"]]), parts["w2"])
        else:
            raise KeyError(f"expert {key[1]} of layer {key[0]} is not in {model_dir}")
    return out
