"""A tiny, deterministic Llama-architecture model for tests and local runs.

`create_tiny_model(dir)` writes a complete Hugging Face model directory
(config, generation config, safetensors weights, byte-level BPE tokenizer with
a chat template) built from nothing but code: the tokenizer is trained on a
corpus written in this file, and the weights come from a seeded generator.
Two calls give byte-identical files.

Tokenizer decisions:

* Byte-level BPE with no normalizer, so `decode(encode(s)) == s` for any
  Unicode string (special tokens skipped).
* Like Llama, encoding with `add_special_tokens=True` puts `<s>` first; no
  `</s>` is appended.
* The chat template writes `<s>` itself (Hugging Face tokenizes chat text with
  `add_special_tokens=False`), then one block per message::

      <|user|>\\nhi</s>\\n<|assistant|>\\n

  Every turn ends with the eos token `</s>`, so the single `eos_token_id` in
  the configs is also the end-of-turn token. `<|end|>` is reserved but unused.

The weights use a larger init than the usual 0.02 so that logits spread over
several units: greedy decoding then has no near-ties that could flip between
batched and unbatched arithmetic.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

KINDS = ("tiny",)

SPECIAL_TOKENS = [
    "<s>",
    "</s>",
    "<pad>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
]
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

TINY_SHAPE = {
    "vocab_size": 4096,
    "hidden_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
}

SEED = 0
EMBED_STD = 1.0  # token embeddings: unit scale, so tokens are well separated
LM_HEAD_LOGIT_STD = 4.0  # target std of one logit over the vocabulary
RESIDUAL_SCALE = 1.0  # extra factor on o_proj/down_proj, which feed the residual stream

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# About four hundred words of hand-written text; the tokenizer learns most of
# its merges from these plus the generated sentences below.
HANDWRITTEN_TEXT = """\
Serving a large language model is mostly a problem of moving memory around.
A request arrives at the gateway, which checks it, turns the prompt into tokens
and hands it to a scheduler. The scheduler decides which requests share the
next batch. Prefill reads the whole prompt at once and fills the key value
cache; decode then produces one token per step for every running sequence.
Prefill is limited by compute, while decode is limited by memory bandwidth,
so many systems run the two phases on different workers and ship the cache
between them.

The key value cache grows with every token. Paged attention splits it into
fixed size blocks, so that sequences of very different lengths can share one
pool without fragmentation. When the pool is full the scheduler must wait,
preempt a sequence, or swap its blocks to host memory. Prefix caching lets
two requests with the same system prompt reuse the same blocks.

Greedy decoding picks the token with the highest logit. Sampling draws from
the softmax of the logits divided by the temperature, often after a top k or
top p cut. A seeded request should give the same tokens whether it runs alone
or inside a batch of sixty four others, which is harder than it sounds,
because floating point addition is not associative.

Autoscaling watches queue depth, time to first token and inter token latency.
When the queue grows, it starts another replica; when traffic falls, it drains
one and moves its work elsewhere. A drain must finish or hand off every
running request before the process exits. Health checks, readiness probes and
graceful shutdown keep the fleet calm while nodes come and go.

Mixture of experts models route each token to a few experts out of many.
Expert parallelism places experts on different devices and exchanges tokens
with all to all communication. Load balancing matters: a hot expert becomes
the bottleneck for the whole batch.

Quantization stores weights in eight or four bits to save memory and
bandwidth. Speculative decoding lets a small draft model propose several
tokens that the large model verifies in one pass. Continuous batching adds
new requests to the running batch as soon as a slot frees up, instead of
waiting for the slowest sequence to finish.

Good serving systems measure everything: throughput in tokens per second,
latency percentiles, cache hit rate, and the cost of every request. The
numbers tell you where the time goes, and the time usually goes to memory.
Café, naïve, façade, Zürich, São Paulo, 東京, 世界, and 🙂 are here too.
"""

WORD_LIST = {
    "det": ["the", "a", "every", "one", "each", "this", "that", "some", "no", "another"],
    "adj": [
        "small", "large", "fast", "slow", "busy", "idle", "warm", "cold", "new", "old",
        "hungry", "quiet", "noisy", "stable", "random", "greedy", "paged", "shared",
        "remote", "local", "tiny", "huge", "fresh", "stale", "sparse", "dense",
    ],
    "noun": [
        "model", "token", "request", "batch", "worker", "gateway", "scheduler", "cache",
        "block", "prompt", "expert", "replica", "queue", "server", "client", "tensor",
        "kernel", "layer", "head", "sequence", "stream", "node", "cluster", "router",
        "sampler", "decoder", "encoder", "weight", "logit", "vector", "matrix", "engine",
        "memory", "budget", "latency", "deadline", "signal", "metric", "probe", "pool",
    ],
    "verb": [
        "reads", "writes", "sends", "holds", "drops", "moves", "splits", "merges",
        "routes", "drains", "starts", "stops", "waits for", "schedules", "evicts",
        "copies", "shares", "checks", "measures", "streams", "decodes", "samples",
        "prefills", "batches", "rejects", "accepts", "retries", "caches",
    ],
    "prep": ["to", "from", "with", "after", "before", "inside", "beside", "under", "over", "near"],
}

SYLLABLES = [
    "ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qui", "dor", "fen",
    "gal", "hin", "jor", "ket", "lun", "mar", "nos", "pel", "ros", "sul", "tam", "ver",
    "wex", "yul", "zan", "bro", "cla", "dri", "ste", "tra", "pho", "sha", "che", "ion",
    "ent", "ure", "ous", "ism", "ity", "ble", "ing", "est", "ary", "ory", "ual",
]


def _generated_lines(rng: random.Random) -> list[str]:
    """Deterministic sentences, made-up words, identifiers and numbers."""
    lines = []
    for _ in range(3000):
        words = [
            rng.choice(WORD_LIST["det"]).capitalize(),
            rng.choice(WORD_LIST["adj"]),
            rng.choice(WORD_LIST["noun"]),
            rng.choice(WORD_LIST["verb"]),
            rng.choice(WORD_LIST["det"]),
            rng.choice(WORD_LIST["noun"]),
            rng.choice(WORD_LIST["prep"]),
            rng.choice(WORD_LIST["det"]),
            rng.choice(WORD_LIST["adj"]),
            rng.choice(WORD_LIST["noun"]),
        ]
        lines.append(" ".join(words) + rng.choice([".", "!", "?", ";", ","]))
    for _ in range(3000):
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))
        lines.append(f"{name.capitalize()} {rng.choice(WORD_LIST['verb'])} {name}.")
    for _ in range(1500):
        a, b = rng.choice(WORD_LIST["adj"]), rng.choice(WORD_LIST["noun"])
        lines.append(f"{a}_{b} = {a.capitalize()}{b.capitalize()}({rng.randint(0, 99999)})")
    for _ in range(1500):
        ms = rng.randint(0, 9999) / 10
        lines.append(
            f"request {rng.randint(0, 999999)} took {ms} ms on node-{rng.randint(0, 63)} "
            f"({rng.randint(1, 100)}% of {rng.randint(1, 8192)} tokens)"
        )
    return lines


def _training_corpus() -> list[str]:
    """The whole tokenizer training corpus, built in code."""
    return HANDWRITTEN_TEXT.splitlines() + _generated_lines(random.Random(SEED))


def _build_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer on the in-code corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"tokenizer corpus too small: got {tokenizer.get_vocab_size()} tokens, "
            f"want {vocab_size}"
        )
    for token, token_id in ((BOS, BOS_ID), (EOS, EOS_ID), (PAD, PAD_ID)):
        assert tokenizer.token_to_id(token) == token_id, token
    # Llama style: a bos token in front, no eos at the end.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, BOS_ID)],
    )
    return tokenizer


def _config(shape: dict) -> dict:
    """The config.json contents for a Llama model of this shape."""
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": shape["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": shape["intermediate_size"],
        "max_position_embeddings": shape["max_position_embeddings"],
        "mlp_bias": False,
        "num_attention_heads": shape["num_attention_heads"],
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_key_value_heads": shape["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": shape["rms_norm_eps"],
        "rope_scaling": None,
        "rope_theta": shape["rope_theta"],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": shape["vocab_size"],
    }


Normal = Callable[[int, int, float], torch.Tensor]  # (rows, cols, std) -> the next seeded [rows, cols] draw
MlpWeights = Callable[[str, dict, Normal, float], dict[str, torch.Tensor]]  # (layer prefix, shape, normal, residual std)


def _dense_mlp(p: str, shape: dict, normal: Normal, residual_std: float) -> dict[str, torch.Tensor]:
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    return {
        p + "mlp.gate_proj.weight": normal(inter, hidden, hidden**-0.5),
        p + "mlp.up_proj.weight": normal(inter, hidden, hidden**-0.5),
        p + "mlp.down_proj.weight": normal(hidden, inter, residual_std * inter**-0.5),
    }


def seeded_weights(shape: dict, seed: int, mlp: MlpWeights) -> dict[str, torch.Tensor]:
    """Seeded float32 weights under the standard Hugging Face Llama names, each layer's MLP from `mlp`.

    Every linear layer reads an RMS-normalised input (or a sum of such
    outputs), so a std of 1/sqrt(fan_in) keeps activations near unit scale.
    The two projections that write into the residual stream are scaled down by
    sqrt(2 * layers) so it stays stable. lm_head is sized so that each logit
    has a std of about LM_HEAD_LOGIT_STD. The draws follow the order the
    names are written in, so the same shape, seed and `mlp` give the same bytes.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = shape["hidden_size"]
    vocab = shape["vocab_size"]
    layers = shape["num_hidden_layers"]
    head_dim = hidden // shape["num_attention_heads"]
    q_out = shape["num_attention_heads"] * head_dim
    kv_out = shape["num_key_value_heads"] * head_dim
    residual_std = RESIDUAL_SCALE / (2 * layers) ** 0.5

    def normal(rows: int, cols: int, std: float) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen, dtype=torch.float32) * std).contiguous()

    weights = {"model.embed_tokens.weight": normal(vocab, hidden, EMBED_STD)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = torch.ones(hidden)
        weights[p + "self_attn.q_proj.weight"] = normal(q_out, hidden, hidden**-0.5)
        weights[p + "self_attn.k_proj.weight"] = normal(kv_out, hidden, hidden**-0.5)
        weights[p + "self_attn.v_proj.weight"] = normal(kv_out, hidden, hidden**-0.5)
        weights[p + "self_attn.o_proj.weight"] = normal(hidden, q_out, residual_std * q_out**-0.5)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        weights.update(mlp(p, shape, normal, residual_std))
    weights["model.norm.weight"] = torch.ones(hidden)
    weights["lm_head.weight"] = normal(vocab, hidden, LM_HEAD_LOGIT_STD * hidden**-0.5)
    return weights


def _write_json(path: Path, data: dict) -> None:
    """Write JSON with sorted keys and a trailing newline."""
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")


def write_model_dir(out_dir: str | Path, config: dict, weights: dict[str, torch.Tensor]) -> Path:
    """Write a Hugging Face model directory with the tiny tokenizer, `weights` and `config`.

    config.json is written last, so its presence marks a finished model.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(config["vocab_size"])
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    extra_tokens = [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)]
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "additional_special_tokens": extra_tokens,
            "model_max_length": config["max_position_embeddings"],
            "padding_side": "left",
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    _write_json(
        out / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": extra_tokens},
    )
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # save_file may create it owner-only
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "do_sample": False},
    )
    _write_json(out / "config.json", config)
    return out


def create_tiny_model(out_dir: str | Path, kind: str = "tiny") -> Path:
    """Write a tiny Llama model in Hugging Face format into out_dir and return it.

    The result is byte-for-byte the same on every call (within one install).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; allowed kinds: {', '.join(KINDS)}")
    return write_model_dir(out_dir, _config(TINY_SHAPE), seeded_weights(TINY_SHAPE, SEED, _dense_mlp))


def default_model_dir() -> Path:
    """$ELASTUNE_HOME/models/tiny, with ELASTUNE_HOME defaulting to ~/.cache/elastune."""
    home = os.environ.get("ELASTUNE_HOME") or os.path.join("~", ".cache", "elastune")
    return Path(home).expanduser() / "models" / "tiny"


def ensure_tiny_model(path: str | Path | None = None) -> Path:
    """Return a directory holding the tiny model, creating it if config.json is missing."""
    return ensure_model_dir(Path(path).expanduser() if path is not None else default_model_dir(), create_tiny_model)


def ensure_model_dir(target: Path, create: Callable[[Path], Path]) -> Path:
    """Return `target`, first running `create` into it if config.json is missing.

    The model is built in a temporary directory beside the target and renamed
    into place, so a concurrent reader never sees a half-written model; if
    another process wins the race, its copy is kept and ours is discarded.
    """
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        create(tmp)
        try:
            # Replaces target only if it is missing or an empty directory.
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise FileExistsError(
                    f"{target} exists and is not a model directory (no config.json)"
                ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
