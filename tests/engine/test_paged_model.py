"""CausalLM.forward_paged over a PagedKvCache, checked against transformers in fp32.

Sequences are teacher-forced (prompt + fixed continuation), so every row's logits can be
compared with one full-sequence transformers forward, whatever mix of decode rows, prefill
chunks and shared prefix blocks a step holds.
"""

from __future__ import annotations

import pytest
import torch

from services.engine.batch import SeqWork, build_batch
from services.engine.block_manager import BlockManager
from services.engine.kv_cache import PagedKvCache
from tests.engine.test_model import TOL, VOCAB, _build, _hf_forward, _hf_kv

BS = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["llama_gqa_bias", "qwen2", "mistral"])
def pair(request, tmp_path_factory):
    return _build(tmp_path_factory, request.param)


class Seq:
    def __init__(self, hf, name, tokens, prompt_len):
        self.name = name
        self.tokens = tokens
        self.prompt_len = prompt_len
        self.done = 0  # positions whose KV is in the cache
        self.ref, self.past = _hf_forward(hf, tokens)  # ref[p] predicts token p + 1


def _cache(ours, blocks):
    cache = PagedKvCache(ours.config, blocks, BS, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    for t in cache.k + cache.v:  # garbage everywhere: an unmasked stale key shows at once
        t.copy_(torch.randn(t.shape, generator=g) * 50)
    return cache


def _step(ours, cache, mgr, plan):
    """plan: [(seq, n)]: feed n more tokens of each; check the logits of each last row. A seq with
    a `seq_id` attribute is named by it (so the CPU decode mirror keeps its rows across steps)."""
    work = []
    targets = []
    for s, n in plan:
        target = s.done + n
        if not mgr.has(s.name):
            s.done = mgr.allocate(s.name, s.tokens[:target])  # a prefix-cache hit skips ahead
        assert mgr.grow(s.name, target)
        work.append(SeqWork(s.tokens[s.done : target], s.done, mgr.block_table(s.name), sample=True,
                            seq_id=getattr(s, "seq_id", -1)))
        targets.append(target)
    logits = ours.forward_paged(build_batch(work, BS, torch.device("cpu")), cache)
    # logits come back in decode-rows-first order
    order = sorted(range(len(plan)), key=lambda i: len(work[i].tokens) != 1)
    for row, i in zip(logits, order):
        s = plan[i][0]
        s.done = targets[i]
        err = (row - s.ref[s.done - 1]).abs().max()
        assert err < TOL, f"{s.name} at position {s.done - 1}: max abs err {err}"
        mgr.commit(s.name, s.tokens, s.done)


def _make(hf, g, name, prompt_len, cont=10, prefix=()):
    body = torch.randint(3, VOCAB, (prompt_len + cont - len(prefix),), generator=g).tolist()
    return Seq(hf, name, list(prefix) + body, prompt_len)


def test_mixed_decode_rows_and_prefill_chunks_match_hf(pair):
    hf, _, ours = pair
    g = torch.Generator().manual_seed(11)
    mgr = BlockManager(40, BS)
    cache = _cache(ours, 40)
    a, b, c, d = (_make(hf, g, n, p) for n, p in (("a", 6), ("b", 13), ("c", 3), ("d", 21)))
    _step(ours, cache, mgr, [(a, 6)])  # whole prompt in one pass
    _step(ours, cache, mgr, [(b, 5), (a, 1)])  # a chunk beside a decode row
    _step(ours, cache, mgr, [(a, 1), (b, 5), (c, 3)])  # two chunks, one decode
    _step(ours, cache, mgr, [(b, 3), (a, 1), (c, 1)])  # b's last chunk
    for _ in range(2):
        _step(ours, cache, mgr, [(c, 1), (a, 1), (b, 1)])  # decode only, reordered
    _step(ours, cache, mgr, [(d, 7), (b, 1)])
    _step(ours, cache, mgr, [(d, 1), (a, 1)])  # a one-token "chunk" of d's prompt is a decode row
    _step(ours, cache, mgr, [(d, 13), (c, 1), (b, 1), (a, 1)])
    for _ in range(3):
        _step(ours, cache, mgr, [(a, 1), (b, 1), (c, 1), (d, 1)])
    mgr.check()
    # a's blocks go back to the pool and are reused by a new sequence: no stale key leaks
    mgr.free("a")
    e = _make(hf, g, "e", 9)
    _step(ours, cache, mgr, [(e, 9), (b, 1)])
    _step(ours, cache, mgr, [(e, 1), (d, 1)])


def test_kv_written_by_the_step_matches_hf_and_reads_back(pair):
    hf, _, ours = pair
    g = torch.Generator().manual_seed(5)
    mgr = BlockManager(16, BS)
    cache = _cache(ours, 16)
    s = _make(hf, g, "s", 11, cont=0)
    _step(ours, cache, mgr, [(s, 7)])
    _step(ours, cache, mgr, [(s, 4)])
    for layer in range(ours.config.num_layers):
        kv = cache.read(layer, mgr.block_table("s"), 11)  # [2, KVH, 11, D]
        ref_k, ref_v = _hf_kv(s.past, layer)
        assert (kv[0] - ref_k).abs().max() < TOL and (kv[1] - ref_v).abs().max() < TOL
    # write() places a prompt's KV (as a prefill worker ships it) so decoding continues exactly
    t = _make(hf, g, "t", 9)
    mgr.allocate("t", t.tokens[:9], num_tokens=10)
    for layer in range(ours.config.num_layers):
        ref_k, ref_v = _hf_kv(t.past, layer)
        cache.write(layer, mgr.block_table("t"), torch.stack((ref_k[:, :9], ref_v[:, :9])))
    t.done = 9
    for _ in range(3):
        _step(ours, cache, mgr, [(t, 1)])


def test_shared_prefix_blocks_give_the_same_logits(pair):
    hf, _, ours = pair
    g = torch.Generator().manual_seed(9)
    mgr = BlockManager(24, BS)
    cache = _cache(ours, 24)
    system = torch.randint(3, VOCAB, (10,), generator=g).tolist()  # 2 full blocks + 2 tokens
    a = _make(hf, g, "a", 14, prefix=system)
    _step(ours, cache, mgr, [(a, 14)])
    b = _make(hf, g, "b", 12, prefix=system)
    _step(ours, cache, mgr, [(b, 12), (a, 1)])  # allocate() finds a's two full blocks
    assert b.done == 12 and mgr.block_table("b")[:2] == mgr.block_table("a")[:2]
    assert [mgr.ref_count(x) for x in mgr.block_table("a")[:2]] == [2, 2]
    assert mgr.prefix_hits == 2
    for _ in range(4):
        _step(ours, cache, mgr, [(a, 1), (b, 1)])
    mgr.check()
