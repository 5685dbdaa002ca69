"""The serving model in bf16 on a GPU against transformers on the same GPU (needs CUDA)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_bf16_logits_match_transformers_on_gpu(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from services.engine.kv_cache import KvCache
    from services.engine.loader import load_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=768, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    ref = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    ours = load_model(tmp_path, dtype="bfloat16", device="cuda")

    prompts = [torch.randint(0, 1024, (n,)) for n in (37, 64, 5)]
    tokens = torch.zeros(3, 64, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = torch.tensor([len(p) for p in prompts])
    logits, kv = ours.prefill(tokens.cuda(), lengths.cuda())
    with torch.no_grad():
        for i, p in enumerate(prompts):
            assert rel_err(logits[i], ref(p[None].cuda()).logits[0, -1]) < 1e-2

    cache = KvCache(ours.config, 4, 128, torch.bfloat16, torch.device("cuda"))
    slots = [3, 0, 1]
    for i, p in enumerate(prompts):
        for layer, (k, v) in enumerate(kv):
            cache.write_prompt(slots[i], layer, torch.stack((k[i, :, : len(p)], v[i, :, : len(p)])))
    seqs = [p.tolist() + [int(logits[i].argmax())] for i, p in enumerate(prompts)]
    for _ in range(4):
        pos = torch.tensor([len(s) - 1 for s in seqs], device="cuda")
        step = ours.decode(torch.tensor([s[-1] for s in seqs], device="cuda"), pos, torch.tensor(slots, device="cuda"),
                           cache, (0, 4), int(pos.max()) + 1)
        with torch.no_grad():
            for i, s in enumerate(seqs):
                assert rel_err(step[i], ref(torch.tensor([s], device="cuda")).logits[0, -1]) < 1e-2
        for i, s in enumerate(seqs):
            s.append(int(step[i].argmax()))


def test_bf16_paged_step_matches_transformers_on_gpu(tmp_path):
    """forward_paged on the GPU: a prompt chunk, then a second chunk beside decode rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from services.engine.batch import SeqWork, build_batch
    from services.engine.block_manager import BlockManager
    from services.engine.kv_cache import PagedKvCache
    from services.engine.loader import load_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=768, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    ref = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    ours = load_model(tmp_path, dtype="bfloat16", device="cuda")
    dev = torch.device("cuda")
    mgr = BlockManager(64, 16)
    cache = PagedKvCache(ours.config, 64, 16, torch.bfloat16, dev)
    seqs = {name: torch.randint(0, 1024, (n,)).tolist() for name, n in (("a", 40), ("b", 70), ("c", 9))}
    done = {name: 0 for name in seqs}

    def step(plan):
        work = []
        for name, n in plan:
            if not mgr.has(name):
                mgr.allocate(name, seqs[name][: done[name] + n], num_tokens=0)
            assert mgr.grow(name, done[name] + n)
            work.append(SeqWork(seqs[name][done[name] : done[name] + n], done[name], mgr.block_table(name), sample=True))
        logits = ours.forward_paged(build_batch(work, 16, dev), cache)
        order = sorted(range(len(plan)), key=lambda i: len(work[i].tokens) != 1)
        with torch.no_grad():
            for row, i in zip(logits, order):
                name, n = plan[i]
                done[name] += n
                expected = ref(torch.tensor([seqs[name][: done[name]]], device=dev)).logits[0, -1]
                assert rel_err(row, expected) < 1e-2, name

    step([("a", 40), ("b", 30)])
    seqs["a"].append(7)  # a decodes from here on
    step([("a", 1), ("b", 40), ("c", 9)])
    for _ in range(3):
        for name in seqs:
            seqs[name].append(int(torch.randint(0, 1024, (1,))))
        step([("c", 1), ("a", 1), ("b", 1)])
