"""Dense decoder-only transformer (Llama / Mistral / Qwen2) written for serving.

Two entry points share the weights:
- `prefill(tokens, lengths)`: a right-padded batch of prompts; returns the logits at each
  prompt's last token and every layer's K/V so the caller can ship it to a decode worker.
- `forward_paged(batch, cache)`: the decode engine's step over a paged KV cache; a batch
  mixes one-token decode rows and prefill chunks that start at an offset (chunked prefill,
  prefix-cache hits, recompute after preemption).
- `decode(tokens, positions, slots, cache)`: one new token per sequence over a slot-indexed
  cache (whole-context slots; kept for callers of the slot layout).
Q/K/V and gate/up projections are fused into single matmuls.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .batch import StepBatch
from .decode_mirror import DecodeMirror
from .kv_cache import KvCache, PagedKvCache
from .model_config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel instead of six small ops
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_type {kind!r} is not supported; supported: default, linear, llama3")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.o_bias)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, hidden] -> q [B, H, T, D], k and v [B, KVH, T, D], RoPE applied to q and k.

        cos, sin [B, T, 1, D]. q and k heads are rotated together in one pass.
        """
        b, t, _ = x.shape
        heads = self.qkv_proj(x).view(b, t, -1, self.head_dim)  # [B, T, H + 2 KVH, D]
        qk = rotate(heads[:, :, : self.num_heads + self.num_kv_heads], cos, sin)
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=2)
        v = heads[:, :, self.num_heads + self.num_kv_heads :]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [B, H, T, D] over k, v [B, KVH, S, D] with mask [B, 1, T, S] -> [B, T, hidden]."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads)
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


    def attend_paged(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        batch: StepBatch, scratch: "GatherScratch", decode_kv=None,
    ) -> torch.Tensor:
        """Write the step's new K/V into the paged cache, then attend over it.

        q [N, H, D], k and v [N, KVH, D] for the step's N new tokens; k_cache, v_cache
        [blocks, block_size, KVH, D]. Returns [N, H * D]. At most three calls whatever the
        number of sequences (see batch.py). Decode rows and chunks after a cached prefix
        gather their blocks into a reused buffer (on a GPU a paged-attention kernel would read
        the blocks in place), or the decode rows come from `decode_kv(k, v) -> keys, values`,
        a DecodeMirror layer.
        """
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, batch.slot_ids, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, batch.slot_ids, v)
        gqa = self.num_kv_heads != self.num_heads
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])  # [N, H * D]
        g = batch.decode
        if g is not None:
            if decode_kv is not None:
                keys, values = decode_kv(k[: g.size], v[: g.size])  # [B, KVH, S, D]
            else:
                keys, values = scratch.gather("decode", k_cache, v_cache, g)
            # the G query heads of a KV head share the row's mask, so they ride as G query rows
            # over that head's keys: no repeated K/V for GQA, and each kernel call sees G rows
            qd = q[: g.size].view(g.size, self.num_kv_heads, -1, self.head_dim)  # [B, KVH, G, D]
            res = F.scaled_dot_product_attention(qd, keys, values, attn_mask=g.mask)  # [B, KVH, G, D]
            out[: g.size] = res.reshape(g.size, -1)  # head h = kv_head * G + g, as projected
        g = batch.prefill
        if g is not None:
            keys, values = scratch.gather("prefill", k_cache, v_cache, g)  # [C, KVH, S, D]
            res = F.scaled_dot_product_attention(_padded(q, g), keys, values, attn_mask=g.mask, enable_gqa=gqa)
            out.index_copy_(0, g.dest, _unpadded(res, g))
        g = batch.fresh
        if g is not None:  # from position 0: the chunk's own new K/V are all its keys
            res = F.scaled_dot_product_attention(_padded(q, g), _padded(k, g), _padded(v, g), is_causal=True,
                                                 enable_gqa=gqa)
            out.index_copy_(0, g.dest, _unpadded(res, g))
        return out


def _padded(x: torch.Tensor, g) -> torch.Tensor:
    """x [N, heads, D] -> [C, heads, T, D]: each chunk's rows, padded to the longest."""
    return x.index_select(0, g.rows).view(g.size, g.q_len, *x.shape[1:]).transpose(1, 2)


def _unpadded(res: torch.Tensor, g) -> torch.Tensor:
    """[C, H, T, D] -> [sum n, H * D]: the real rows, in the group's order."""
    return res.transpose(1, 2).reshape(g.size * g.q_len, -1).index_select(0, g.outputs)


class GatherScratch:
    """Buffers that paged blocks are gathered into, kept across layers and steps: allocating
    tens of MB per layer per step costs page faults on CPU and allocator churn on a GPU."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)

    def gather(self, name: str, k_cache: torch.Tensor, v_cache: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
        """k_cache, v_cache [blocks, block_size, KVH, D] -> keys, values [B, KVH, width * block_size, D]
        (strided views over one copy; index_select is ~1.5x faster than advanced indexing on CPU)."""
        shape = (group.blocks.shape[0], *k_cache.shape[1:])  # [B * width, block_size, KVH, D]
        out = []
        for kind, cache in (("k", k_cache), ("v", v_cache)):
            rows = torch.index_select(cache, 0, group.blocks, out=self._buffer(name + kind, shape, cache))
            out.append(rows.view(group.size, -1, *cache.shape[2:]).transpose(1, 2))
        return out[0], out[1]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope_cos = self.rope_sin = None  # filled by set_rope_tables() once weights are placed
        self.scratch = GatherScratch()  # forward_paged's gather buffers
        self.mirror = DecodeMirror()  # forward_paged's decode rows, kept across steps (CPU)

    def set_rope_tables(self, device: torch.device, dtype: torch.dtype) -> None:
        """cos/sin for every position, computed in float32 as transformers does, then cast.

        Plain attributes, not buffers: the loader calls this after moving the model.
        """
        positions = torch.arange(self.config.max_position_embeddings, device=device, dtype=torch.float32)
        freqs = positions[:, None] * rope_inv_freq(self.config).to(device)
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.rope_cos, self.rope_sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def _rope(self, positions: torch.Tensor):
        """positions [B, T] -> cos, sin [B, T, 1, D] (broadcast over heads)."""
        return self.rope_cos[positions][:, :, None], self.rope_sin[positions][:, :, None]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h)).float()

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, on_layer=None):
        """tokens [B, T] right-padded, lengths [B].

        Returns logits at each prompt's last token [B, V] and, per layer, (k, v) each
        [B, KVH, T, D]; positions at or beyond a prompt's length are padding.
        on_layer(i, k, v), if given, runs as soon as layer i's K/V exist, so a caller can ship
        them while later layers compute.
        """
        b, t = tokens.shape
        positions = torch.arange(t, device=tokens.device).expand(b, t)
        cos, sin = self._rope(positions)
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        valid_keys = positions < lengths[:, None]  # [B, T]
        mask = causal[None, None] & valid_keys[:, None, None, :]  # [B, 1, T, T]
        h = self.embed_tokens(tokens)
        kv = []
        for layer in self.layers:
            x = layer.input_layernorm(h)
            q, k, v = layer.self_attn.project(x, cos, sin)
            kv.append((k, v))
            if on_layer is not None:
                on_layer(len(kv) - 1, k, v)
            h = h + layer.self_attn.attend(q, k, v, mask)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        last = h[torch.arange(b, device=tokens.device), lengths - 1]  # [B, hidden]
        return self._logits(last), kv

    @torch.inference_mode()
    def forward_paged(self, batch: StepBatch, cache: PagedKvCache) -> torch.Tensor:
        """One engine step over the paged cache; returns logits [R, V] at batch.logit_rows."""
        dtype = self.embed_tokens.weight.dtype
        for g in (batch.decode, batch.prefill):  # once per step, not per layer
            if g is not None and g.mask is not None and g.mask.dtype != dtype:
                g.mask = g.mask.to(dtype)
        g = batch.decode
        # on CPU (no paged-attention kernel) decode rows attend over a mirror kept across steps
        # instead of gathering their blocks every layer; on a GPU the gather is cheap and the
        # mirror would take memory the KV pool was sized to use
        step = None
        if g is not None and cache.device.type == "cpu" and min(g.seq_ids) >= 0:
            step = self.mirror.plan(g, cache)
        else:
            self.mirror.forget()
        h = self.embed_tokens(batch.tokens)[None]  # [1, N, hidden]
        cos, sin = self._rope(batch.positions[None])  # [1, N, 1, D]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(h), cos, sin)  # q [1, H, N, D], k, v [1, KVH, N, D]
            decode_kv = None if step is None else partial(self.mirror.update, i, step, cache.k[i], cache.v[i])
            out = attn.attend_paged(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                    cache.k[i], cache.v[i], batch, self.scratch, decode_kv)  # [N, H * D]
            h = h + attn.o_proj(out)[None]
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self._logits(h[0, batch.logit_rows])

    @torch.inference_mode()
    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: KvCache,
        slot_range: tuple[int, int], span: int,
    ) -> torch.Tensor:
        """One new token per sequence; returns next-token logits [B, V].

        tokens, positions, slots [B]. Each token's K/V is written at (slot, position), then
        attention runs over the cache rows slot_range = [lo, hi) as a view, not a gathered
        copy (copying every sequence's K/V each step cost more than the attention itself).
        Rows in the range that are not in the batch compute a throwaway result; the slot
        pool hands out the lowest free slots, so the range stays close to the batch.
        span = max(positions) + 1.
        """
        lo, hi = slot_range
        rows = slots - lo  # [B] row of each sequence inside the range
        n = hi - lo
        cos, sin = self._rope(positions[:, None])
        row_pos = torch.zeros(n, dtype=positions.dtype, device=positions.device).index_copy_(0, rows, positions)
        keys = torch.arange(span, device=tokens.device)
        mask = (keys[None, :] <= row_pos[:, None])[:, None, None, :]  # [n, 1, 1, span]
        h = self.embed_tokens(tokens[:, None])  # [B, 1, hidden]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(h), cos, sin)  # q [B, H, 1, D]
            cache.k[i][slots, :, positions] = k[:, :, 0]
            cache.v[i][slots, :, positions] = v[:, :, 0]
            q_rows = q.new_zeros(n, *q.shape[1:]).index_copy_(0, rows, q)  # [n, H, 1, D]
            k_rows = cache.k[i][lo:hi, :, :span]  # [n, KVH, span, D], a view
            v_rows = cache.v[i][lo:hi, :, :span]
            out = F.scaled_dot_product_attention(q_rows, k_rows, v_rows, attn_mask=mask, enable_gqa=attn.num_kv_heads != attn.num_heads)
            out = out[rows].transpose(1, 2).reshape(h.shape[0], 1, -1)  # [B, 1, H*D]
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self._logits(h[:, 0])
