"""Tests for the tiny deterministic Llama model in services/engine/tiny.py."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.engine.tiny import create_tiny_model, default_model_dir, ensure_tiny_model

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """One tiny model shared by the read-only tests in this file."""
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def test_creates_expected_files(model_dir):
    assert {p.name for p in model_dir.iterdir()} == EXPECTED_FILES
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 4096
    assert config["num_key_value_heads"] == 2
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]
    assert generation["bos_token_id"] == config["bos_token_id"]


def test_reproducible_bytes(model_dir, tmp_path):
    other = create_tiny_model(tmp_path / "again")
    for name in EXPECTED_FILES:
        assert (model_dir / name).read_bytes() == (other / name).read_bytes(), name


def test_standard_weight_names(model_dir):
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("lm_head.weight").dtype == torch.float32
    assert "model.embed_tokens.weight" in names
    assert "model.norm.weight" in names
    assert "lm_head.weight" in names
    for i in range(4):
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"model.layers.{i}.self_attn.{part}.weight" in names
        for part in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{i}.mlp.{part}.weight" in names
        assert f"model.layers.{i}.input_layernorm.weight" in names
        assert f"model.layers.{i}.post_attention_layernorm.weight" in names
    assert len(names) == 2 + 1 + 4 * 9


def test_loads_in_transformers(model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert model.dtype == torch.float32
    n_params = sum(p.numel() for p in model.parameters())
    assert 2_500_000 < n_params < 3_500_000
    ids = torch.tensor([tokenizer("the scheduler batches every request")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 4096)
    # Logits must be spread out, not flat, so greedy decoding has clear winners.
    assert logits[0].std(dim=-1).min().item() > 1.0


def test_tokenizer_roundtrip(tokenizer):
    assert len(tokenizer) == 4096
    texts = ["hello world", "héllo 世界 🙂", "  tabs\tand\nnewlines  ", "Ünïcödé ½ → ∞"]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        plain = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(plain) == text


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith(tokenizer.bos_token)
    assert "<|user|>" in text and "hi" in text
    assert text.endswith("<|assistant|>\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
    for marker in ("<|system|>", "<|user|>", "<|assistant|>"):
        assert tokenizer.convert_tokens_to_ids(marker) in ids


def test_ensure_tiny_model_respects_path_and_is_idempotent(tmp_path):
    target = tmp_path / "models" / "mine"
    assert ensure_tiny_model(target) == target
    assert (target / "config.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    assert ensure_tiny_model(str(target)) == target
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before
    # No temporary directories are left beside the model.
    assert [p.name for p in target.parent.iterdir()] == ["mine"]


def test_default_model_dir_uses_elastune_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ELASTUNE_HOME", str(tmp_path / "home"))
    assert default_model_dir() == tmp_path / "home" / "models" / "tiny"
    assert ensure_tiny_model() == tmp_path / "home" / "models" / "tiny"
    assert (tmp_path / "home" / "models" / "tiny" / "config.json").exists()


def test_bad_kind_raises(tmp_path):
    with pytest.raises(ValueError, match="tiny"):
        create_tiny_model(tmp_path / "bad", kind="huge")
