"""The decode mirror (services/engine/decode_mirror.py): decode rows kept across steps on CPU.

Steps carry sequence ids, so forward_paged attends decode rows over the mirror instead of
gathering blocks. Every row's logits are checked against one full-sequence transformers
forward (teacher forcing, as in test_paged_model.py) while rows stay, join, leave, jump
ahead, outgrow the mirror and move to another cache; the mirror's fill counter shows it
gathers only the rows it must.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from services.engine.batch import SeqWork, build_batch
from services.engine.block_manager import BlockManager
from services.engine.decode_mirror import MARGIN_BLOCKS
from tests.engine.test_model import _build, _hf_kv
from tests.engine.test_paged_model import BS, _cache, _make
from tests.engine.test_paged_model import _step as paged_step

_ids = itertools.count()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return _build(tmp_path_factory, "llama_gqa_bias")  # GQA: query heads folded per KV head


def _step(ours, cache, mgr, plan) -> int:
    """plan: [(seq, n)]; checks every row's logits; returns the rows the mirror gathered."""
    before = ours.mirror.rows_filled
    for s, _ in plan:
        if not hasattr(s, "seq_id"):
            s.seq_id = next(_ids)
    paged_step(ours, cache, mgr, plan)
    return ours.mirror.rows_filled - before


def test_rows_are_kept_joined_and_refilled_only_when_needed(pair):
    hf, _, ours = pair
    g = torch.Generator().manual_seed(21)
    mgr = BlockManager(80, BS)
    cache = _cache(ours, 80)
    a, b, c, d = (_make(hf, g, n, p, cont=14) for n, p in (("a", 5), ("b", 9), ("c", 3), ("d", 7)))
    _step(ours, cache, mgr, [(a, 5), (b, 9)])  # prompts only: no decode rows
    assert _step(ours, cache, mgr, [(a, 1), (b, 1)]) == 2  # first decode step fills both rows
    assert _step(ours, cache, mgr, [(a, 1), (b, 1)]) == 0  # steady: only the new K/V is appended
    assert _step(ours, cache, mgr, [(a, 1), (b, 1), (c, 3)]) == 0  # a chunk beside does not disturb them
    assert _step(ours, cache, mgr, [(a, 1), (b, 1), (c, 1)]) == 1  # c joins at the end: one row filled
    assert _step(ours, cache, mgr, [(a, 1), (c, 1)]) == 1  # b leaves: c moves up a row and is refilled
    assert _step(ours, cache, mgr, [(c, 1), (a, 1)]) == 2  # reordered: both rows refilled
    _step(ours, cache, mgr, [(d, 7), (c, 1), (a, 1)])
    assert _step(ours, cache, mgr, [(c, 1), (a, 1), (d, 1)]) == 1
    # a step without decode rows forgets every row
    e = _make(hf, g, "e", 6)
    _step(ours, cache, mgr, [(e, 6)])
    assert _step(ours, cache, mgr, [(c, 1), (a, 1), (d, 1), (e, 1)]) == 4


def test_a_row_that_skipped_steps_or_a_new_sequence_on_old_blocks_is_refilled(pair):
    hf, _, ours = pair
    g = torch.Generator().manual_seed(22)
    mgr = BlockManager(40, BS)
    cache = _cache(ours, 40)
    a, b = _make(hf, g, "a", 6, cont=12), _make(hf, g, "b", 10, cont=12)
    _step(ours, cache, mgr, [(a, 6), (b, 10)])
    for _ in range(2):
        _step(ours, cache, mgr, [(a, 1), (b, 1)])
    # b computes two positions as a chunk (as after a preemption): its row is stale by one
    _step(ours, cache, mgr, [(a, 1), (b, 2)])
    assert _step(ours, cache, mgr, [(a, 1), (b, 1)]) == 1
    # b ends; its blocks go back to the pool and a new sequence takes b's row and blocks
    mgr.free("b")
    c = _make(hf, g, "c", 13, cont=6)
    _step(ours, cache, mgr, [(a, 1), (c, 13)])
    assert _step(ours, cache, mgr, [(a, 1), (c, 1)]) == 1
    assert _step(ours, cache, mgr, [(a, 1), (c, 1)]) == 0


def test_outgrowing_the_mirror_and_a_new_cache_rebuild_it(pair):
    hf, _, ours = pair
    g = torch.Generator().manual_seed(23)
    steps = (MARGIN_BLOCKS + 2) * BS  # decode past the mirror's room to grow
    mgr = BlockManager(60, BS)
    cache = _cache(ours, 60)
    a, b = _make(hf, g, "a", 3, cont=steps + 2), _make(hf, g, "b", 5, cont=steps + 2)
    _step(ours, cache, mgr, [(a, 3), (b, 5)])
    filled = [_step(ours, cache, mgr, [(a, 1), (b, 1)]) for _ in range(steps)]
    assert filled[0] == 2 and filled.count(2) == 2 and sum(filled) == 4  # one rebuild on the way
    # the same ids at the positions the mirror expects, but against another cache (another
    # engine) holding other tokens: nothing may be reused
    mgr2 = BlockManager(60, BS)
    cache2 = _cache(ours, 60)
    a2, b2 = _make(hf, g, "a", a.done, cont=3), _make(hf, g, "b", b.done, cont=3)
    for s, old in ((a2, a), (b2, b)):
        s.seq_id = old.seq_id
        mgr2.allocate(s.name, s.tokens[: s.prompt_len], num_tokens=s.prompt_len + 1)
        for layer in range(ours.config.num_layers):
            k, v = _hf_kv(s.past, layer)
            cache2.write(layer, mgr2.block_table(s.name), torch.stack((k[:, : s.prompt_len], v[:, : s.prompt_len])))
        s.done = s.prompt_len
    assert _step(ours, cache2, mgr2, [(a2, 1), (b2, 1)]) == 2


def test_a_row_whose_start_is_not_the_next_position_is_refilled(pair):
    """Defensive: the same sequence in the same row whose start jumped (its KV came from
    elsewhere) is gathered again rather than trusted."""
    _, _, ours = pair
    cache = _cache(ours, 16)
    mirror = ours.mirror

    def group(starts):
        work = [SeqWork([1], s, list(range(4 * i, 4 * i + 4)), sample=True, seq_id=1000 + i) for i, s in enumerate(starts)]
        return build_batch(work, BS, torch.device("cpu")).decode

    mirror.plan(group([5, 9]), cache)
    assert mirror.plan(group([6, 10]), cache).fill is None
    step = mirror.plan(group([7, 12]), cache)
    assert step.fill == (1, 2)
    kvh, cap = ours.config.num_kv_heads, mirror.cap_blocks * BS
    assert step.slots.tolist() == [h * cap + 7 for h in range(kvh)] + [(kvh + h) * cap + 12 for h in range(kvh)]
