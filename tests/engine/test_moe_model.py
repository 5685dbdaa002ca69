"""MoeCausalLM (services/engine/moe_model.py) on the tiny MoE model against transformers' Mixtral, fp32."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MixtralForCausalLM

from services.engine.kv_cache import KvCache
from services.engine.loader import load_model
from services.engine.moe_config import MoeConfig
from services.engine.moe_model import MoeCausalLM, mix_experts, pairs
from services.engine.moe_weights import read_experts
from tests.conftest import hf_reference
from tests.engine.test_model import _padded

TOL = 1e-4
PROMPTS = [[0, 55, 812, 17, 999, 42, 7, 300, 64, 1021], [0, 5, 9, 100, 2000, 3], [0, 4000, 12]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tiny_moe_model):
    return hf_reference(tiny_moe_model), load_model(tiny_moe_model, dtype="float32")


def test_tiny_moe_is_a_mixtral_that_transformers_loads(models, tiny_moe_model):
    hf, ours = models
    assert isinstance(hf, MixtralForCausalLM) and isinstance(ours, MoeCausalLM)
    config = MoeConfig.from_dir(tiny_moe_model)
    assert (config.num_experts, config.top_k, config.num_layers) == (8, 2, 4)
    # The checkpoint's experts, as transformers fused them, are the ones we run.
    assert torch.equal(hf.model.layers[1].mlp.experts.gate_up_proj, ours.layers[1].mlp.experts.gate_up_proj)


def test_padded_prefill_logits_match_transformers(models):
    hf, ours = models
    logits, kv = ours.prefill(*_padded(PROMPTS))
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1]
        assert (logits[i] - ref).abs().max().item() < TOL


def test_decode_steps_and_greedy_tokens_match_transformers(models):
    """Prefill, then 12 batched decode steps through the slot cache: every step's logits and the
    greedy tokens equal transformers' generate() (MoE routing is per token, so batching must not
    change which experts a token reaches)."""
    hf, ours = models
    steps = 12
    logits, kv = ours.prefill(*_padded(PROMPTS))
    cache = KvCache(ours.config, len(PROMPTS), 64, torch.float32, torch.device("cpu"))
    for slot, prompt in enumerate(PROMPTS):
        for layer, (k, v) in enumerate(kv):
            cache.write_prompt(slot, layer, torch.stack((k[slot, :, : len(prompt)], v[slot, :, : len(prompt)])))
    generated = [[int(logits[i].argmax())] for i in range(len(PROMPTS))]
    step_logits = []
    for _ in range(steps - 1):
        positions = torch.tensor([len(p) + len(g) - 1 for p, g in zip(PROMPTS, generated)])
        tokens = torch.tensor([g[-1] for g in generated])
        out = ours.decode(tokens, positions, torch.arange(len(PROMPTS)), cache, (0, len(PROMPTS)), int(positions.max()) + 1)
        step_logits.append(out)
        for i in range(len(PROMPTS)):
            generated[i].append(int(out[i].argmax()))
    for i, prompt in enumerate(PROMPTS):
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=steps, pad_token_id=2,
                          output_logits=True, return_dict_in_generate=True)
        assert ref.sequences[0, len(prompt):].tolist() == generated[i]
        for step, out in enumerate(step_logits):
            assert (out[i] - ref.logits[step + 1][0]).abs().max().item() < TOL


def test_padding_reaches_no_expert(models):
    """Padding rows of a prefill batch are not routed (no traffic, no counts), and leave the real
    prompts' results unchanged."""
    _, ours = models
    seen = []

    class Spy:
        def forward(self, layer, x, expert_ids, weights):
            seen.append(x.shape[0])
            return ours.layers[layer].mlp.experts.forward(layer, x, expert_ids, weights)

    ours.use_experts(Spy())
    try:
        logits, _ = ours.prefill(*_padded(PROMPTS))
    finally:
        ours.use_experts(None)
    assert seen == [sum(map(len, PROMPTS))] * ours.config.num_layers
    alone, _ = ours.prefill(*_padded(PROMPTS[2:]))
    assert (logits[2] - alone[0]).abs().max().item() < TOL


def test_expert_subsets_read_from_the_checkpoint_sum_to_the_whole(models, tiny_moe_model):
    """What an experts server computes for a subset of experts, summed over a split of the
    experts, is the colocated result (the disaggregated combine)."""
    _, ours = models
    block = ours.layers[2].mlp
    x = torch.randn(9, ours.config.hidden_size, generator=torch.Generator().manual_seed(3))
    ids, w = block.route(x)
    whole = block.experts.forward(2, x, ids, w)
    loaded = read_experts(tiny_moe_model, [2], range(8))
    ti, ex, ww = pairs(ids, w)
    parts = torch.zeros_like(x)
    for subset in ({0, 1, 2}, {3, 4, 5, 6, 7}):
        keep = torch.tensor([int(e) in subset for e in ex])
        parts += mix_experts(x, ti[keep], ex[keep], ww[keep], lambda e: loaded[(2, e)])
    assert (parts - whole).abs().max().item() < 1e-5


def test_attention_biases_of_a_moe_checkpoint_are_loaded(tiny_moe_model, tmp_path):
    """The MoE loader maps attention like the dense one: a checkpoint with attention_bias gets its
    q/k/v biases fused and its o_proj bias kept (the strict load refuses a dropped bias)."""
    model_dir = tmp_path / "biased"
    shutil.copytree(tiny_moe_model, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    weights = load_file(model_dir / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    for name, w in list(weights.items()):
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
            weights[name.removesuffix("weight") + "bias"] = torch.randn(w.shape[0], generator=g)
    save_file(weights, model_dir / "model.safetensors")
    ours = load_model(model_dir, dtype="float32")
    attn = "model.layers.3.self_attn."
    expected = torch.cat([weights[f"{attn}{n}_proj.bias"] for n in "qkv"])
    assert torch.equal(ours.layers[3].self_attn.qkv_proj.bias, expected)
    assert torch.equal(ours.layers[3].self_attn.o_proj.bias, weights[attn + "o_proj.bias"])
