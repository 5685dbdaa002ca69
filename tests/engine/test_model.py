"""CausalLM (services/engine/model.py) loaded by load_model, checked against transformers in fp32.

Every model is a small random Hugging Face model written with save_pretrained. Weights are
re-drawn after HF's init so that biases and norm weights are not their trivial zeros/ones
(a dropped bias or a swapped norm would otherwise go unnoticed).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from services.engine.kv_cache import KvCache
from services.engine.loader import load_model
from services.engine.model import rope_inv_freq
from services.engine.model_config import SUPPORTED_MODEL_TYPES, ModelConfig

TOL = 1e-4
VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

VARIANTS = {
    # plain multi-head attention, non-default rope_theta (read from rope_parameters in transformers 5)
    "llama": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4, rope_theta=500000.0)),
    # grouped-query attention, 4 query heads per KV head; attention_bias also gives o_proj a bias
    "llama_gqa_bias": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=1, attention_bias=True)),
    # qkv bias without o bias
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2, rope_theta=1000000.0)),
    # explicit head_dim different from hidden_size // num_heads
    "mistral": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, head_dim=24)),
    "llama3_rope": (LlamaConfig, LlamaForCausalLM, dict(
        num_key_value_heads=2, rope_scaling=LLAMA3_SCALING, max_position_embeddings=256,
    )),
    "tied": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build(tmp_path_factory, name: str):
    config_cls, model_cls, extra = VARIANTS[name]
    torch.manual_seed(sum(map(ord, name)))
    hf = model_cls(config_cls(**SMALL, **extra)).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    return hf, path, load_model(path, dtype="float32")


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, model dir, our CausalLM) for one variant."""
    return _build(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def llama3_pair(tmp_path_factory):
    return _build(tmp_path_factory, "llama3_rope")


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _padded(prompts):
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    return tokens, lengths


@torch.no_grad()
def _hf_forward(hf, ids):
    out = hf(torch.tensor([ids]), use_cache=True)
    return out.logits[0].float(), out.past_key_values


def _hf_kv(past, layer):
    entry = past.layers[layer]
    return entry.keys[0], entry.values[0]  # [KVH, T, D]


def test_loaded_config_matches_hf(pair):
    hf, _, ours = pair
    c = ours.config
    assert c.num_kv_heads == hf.config.num_key_value_heads
    hc = hf.config
    assert c.head_dim == (getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads)
    assert c.num_layers == hf.config.num_hidden_layers
    assert c.tie_word_embeddings == bool(hf.config.tie_word_embeddings)
    assert ours.embed_tokens.weight.dtype == torch.float32


def test_prefill_logits_and_kv_match_hf(pair):
    hf, _, ours = pair
    prompts = _prompts([7, 1, 19, 12])
    tokens, lengths = _padded(prompts)
    logits, kv = ours.prefill(tokens, lengths)
    assert logits.shape == (len(prompts), VOCAB)
    assert len(kv) == ours.config.num_layers
    for b, prompt in enumerate(prompts):
        ref_logits, past = _hf_forward(hf, prompt)
        assert (logits[b] - ref_logits[-1]).abs().max() < TOL, f"prompt {b}"
        n = len(prompt)
        for layer, (k, v) in enumerate(kv):
            assert k.shape == (len(prompts), ours.config.num_kv_heads, tokens.shape[1], ours.config.head_dim)
            ref_k, ref_v = _hf_kv(past, layer)
            assert (k[b, :, :n] - ref_k).abs().max() < TOL, f"prompt {b} layer {layer} K"
            assert (v[b, :, :n] - ref_v).abs().max() < TOL, f"prompt {b} layer {layer} V"


def test_prefill_row_does_not_depend_on_padding_or_batch(pair):
    _, _, ours = pair
    prompts = _prompts([5, 16, 9], seed=3)
    batch_logits, _ = ours.prefill(*_padded(prompts))
    for b, prompt in enumerate(prompts):
        alone, _ = ours.prefill(*_padded([prompt]))
        assert (batch_logits[b] - alone[0]).abs().max() < TOL


class Seq:
    """A teacher-forced sequence: prompt followed by fixed continuation tokens."""

    def __init__(self, hf, tokens: list[int], prompt_len: int, slot: int):
        self.tokens = tokens
        self.prompt_len = prompt_len
        self.slot = slot
        self.pos = prompt_len  # next position to decode (token tokens[pos] is fed)
        self.ref_logits, _ = _hf_forward(hf, tokens)  # logits[p] predicts token p + 1


def _adopt(ours, cache: KvCache, seq: Seq) -> None:
    """Prefill the prompt alone and place its KV in the sequence's slot (as a decode worker does)."""
    logits, kv = ours.prefill(*_padded([seq.tokens[: seq.prompt_len]]))
    assert (logits[0] - seq.ref_logits[seq.prompt_len - 1]).abs().max() < TOL
    for layer, (k, v) in enumerate(kv):
        cache.write_prompt(seq.slot, layer, torch.stack((k[0], v[0])))


def _decode(ours, tokens, positions, slots, cache):
    """CausalLM.decode as the decode engine calls it: with the slot range [min, max + 1) the
    batch spans and span = max(positions) + 1."""
    rng = (int(slots.min()), int(slots.max()) + 1)
    return ours.decode(tokens, positions, slots, cache, slot_range=rng, span=int(positions.max()) + 1)


def _step(ours, cache: KvCache, batch: list[Seq]) -> None:
    tokens = torch.tensor([s.tokens[s.pos] for s in batch])
    positions = torch.tensor([s.pos for s in batch])
    slots = torch.tensor([s.slot for s in batch])
    logits = _decode(ours, tokens, positions, slots, cache)
    assert logits.shape == (len(batch), VOCAB)
    for row, s in zip(logits, batch):
        err = (row - s.ref_logits[s.pos]).abs().max()
        assert err < TOL, f"slot {s.slot} position {s.pos}: max abs err {err}"
        s.pos += 1


def _garbage_cache(ours, num_slots: int, slot_tokens: int) -> KvCache:
    """A cache whose unused entries hold large garbage: an unmasked stale position shows at once."""
    cache = KvCache(ours.config, num_slots, slot_tokens, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(7)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g) * 50)
    return cache


def test_decode_batches_match_hf(pair):
    hf, _, ours = pair
    g = torch.Generator().manual_seed(11)
    cont = 14

    def make(prompt_len, slot):
        return Seq(hf, torch.randint(3, VOCAB, (prompt_len + cont,), generator=g).tolist(), prompt_len, slot)

    cache = _garbage_cache(ours, num_slots=8, slot_tokens=48)
    a, b, c, d = make(5, 3), make(12, 0), make(2, 6), make(9, 1)
    _adopt(ours, cache, a)
    _adopt(ours, cache, b)
    for _ in range(3):
        _step(ours, cache, [a, b])  # two slots, different positions
    _adopt(ours, cache, c)  # joins mid-way
    _step(ours, cache, [a, b, c])
    _step(ours, cache, [c, a])  # reordered, b sits this step out
    _step(ours, cache, [b])  # alone
    _adopt(ours, cache, d)
    for _ in range(3):
        _step(ours, cache, [d, c, b, a])
    _step(ours, cache, [a, d])
    # a's slot is reused by a new, shorter sequence: a's stale K/V beyond its prompt must not leak
    e = make(3, a.slot)
    _adopt(ours, cache, e)
    for _ in range(4):
        _step(ours, cache, [b, e, c])
    assert (a.pos, b.pos, c.pos, d.pos, e.pos) == (5 + 9, 12 + 12, 2 + 9, 9 + 4, 3 + 4)


def test_greedy_tokens_match_hf_over_20_steps(pair):
    hf, _, ours = pair
    prompts = _prompts([4, 11, 7], seed=5)
    steps = 20
    # reference: greedy with full-sequence forwards in transformers
    expected = []
    for p in prompts:
        ids = list(p)
        for _ in range(steps):
            logits, _ = _hf_forward(hf, ids)
            ids.append(int(logits[-1].argmax()))
        expected.append(ids[len(p):])
    # ours: one batched prefill, then batched decode steps over a slot cache
    slots = [5, 0, 2]
    cache = _garbage_cache(ours, num_slots=6, slot_tokens=40)
    tokens, lengths = _padded(prompts)
    logits, kv = ours.prefill(tokens, lengths)
    for i, (slot, n) in enumerate(zip(slots, lengths.tolist())):
        for layer, (k, v) in enumerate(kv):
            cache.write_prompt(slot, layer, torch.stack((k[i, :, :n], v[i, :, :n])))
    out = [[t] for t in logits.argmax(-1).tolist()]
    positions = lengths.clone()
    for _ in range(steps - 1):
        nxt = _decode(ours, torch.tensor([o[-1] for o in out]), positions, torch.tensor(slots), cache)
        for o, t in zip(out, nxt.argmax(-1).tolist()):
            o.append(t)
        positions += 1
    assert out == expected


def test_llama3_rope_scaling_matches_hf_and_matters(llama3_pair, tmp_path):
    """The scaled frequencies match transformers', and the scaling is not a no-op for the test prompt."""
    hf, path, ours = llama3_pair
    assert ours.config.rope_scaling["rope_type"] == "llama3"
    assert ours.config.max_model_len == 256
    ref_inv = hf.model.rotary_emb.inv_freq.float()
    assert torch.allclose(rope_inv_freq(ours.config), ref_inv, rtol=1e-6, atol=0)
    # a long prompt past original_max_position_embeddings
    prompt = _prompts([200], seed=9)[0]
    ref_logits, _ = _hf_forward(hf, prompt)
    logits, _ = ours.prefill(*_padded([prompt]))
    assert (logits[0] - ref_logits[-1]).abs().max() < TOL
    # the same weights with plain RoPE give clearly different logits: the check above has teeth
    raw = json.loads((path / "config.json").read_text())
    raw.pop("rope_scaling", None)
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": raw["rope_parameters"]["rope_theta"]}
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(raw))
    plain = load_model(tmp_path, dtype="float32")
    assert plain.config.rope_scaling is None
    assert not torch.allclose(rope_inv_freq(plain.config), ref_inv)
    wrong, _ = plain.prefill(*_padded([prompt]))
    assert (wrong[0] - ref_logits[-1]).abs().max() > 100 * TOL


def test_tied_embeddings_use_embedding_matrix(tmp_path_factory):
    hf, path, ours = _build(tmp_path_factory, "tied")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # the loader must fall back to embed_tokens
    assert torch.equal(ours.lm_head.weight, ours.embed_tokens.weight)
    assert torch.equal(ours.lm_head.weight, hf.model.embed_tokens.weight)


def test_unsupported_model_type_is_rejected(tmp_path):
    raw = {
        "model_type": "gpt2", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16,
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as info:
        ModelConfig.from_dir(tmp_path)
    message = str(info.value)
    assert "gpt2" in message
    for name in SUPPORTED_MODEL_TYPES:
        assert name in message
    with pytest.raises(ValueError):
        load_model(tmp_path)


def test_missing_config_json_is_file_not_found(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path, dtype="float32")
