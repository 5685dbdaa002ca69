"""Token selection in services/engine/sampler.py."""

from __future__ import annotations

import math

import pytest
import torch

from services.common.types import SamplingParams
from services.engine.sampler import sample, token_seed

V = 64
GREEDY = SamplingParams(temperature=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _logits(rows: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * scale


def _one(row: torch.Tensor, params: SamplingParams, seed: int, index: int) -> int:
    return sample(row[None], [params], [seed], [index])[0]


def test_greedy_is_argmax():
    logits = _logits(16)
    out = sample(logits, [GREEDY] * 16, [0] * 16, list(range(16)))
    assert out == logits.argmax(-1).tolist()
    # the seed and the index do not matter for greedy rows
    assert sample(logits, [GREEDY] * 16, list(range(100, 116)), [7] * 16) == out


def test_same_seed_and_index_give_same_token():
    row = _logits(1, scale=0.5)[0]  # flat: many tokens are likely
    params = SamplingParams(temperature=1.0)
    for seed in (0, 1, 12345, 2**62 + 3):
        for index in (0, 1, 17):
            assert _one(row, params, seed, index) == _one(row, params, seed, index)


def test_different_index_or_seed_gives_different_tokens():
    row = torch.zeros(V)  # uniform over V tokens
    params = SamplingParams(temperature=1.0)
    by_index = [_one(row, params, 42, i) for i in range(64)]
    by_seed = [_one(row, params, s, 0) for s in range(64)]
    # 64 uniform draws over 64 tokens: a stuck stream would give one value
    assert len(set(by_index)) > 20
    assert len(set(by_seed)) > 20
    assert len({token_seed(42, i) for i in range(1000)}) == 1000
    assert token_seed(1, 2) != token_seed(2, 1)


def test_top_k_1_is_greedy_at_any_temperature():
    logits = _logits(8, seed=1)
    expected = logits.argmax(-1).tolist()
    for temperature in (0.05, 1.0, 5.0, 1000.0):
        params = [SamplingParams(temperature=temperature, top_k=1)] * 8
        for seed in range(5):
            assert sample(logits, params, [seed] * 8, list(range(8))) == expected


def test_tiny_top_p_is_argmax():
    logits = _logits(8, seed=2, scale=0.3)  # flat, so plain sampling would rarely hit the argmax
    expected = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=1.0, top_p=1e-6)] * 8
    for seed in range(10):
        assert sample(logits, params, [seed] * 8, [seed] * 8) == expected


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    row = torch.full((V,), -math.inf)
    row[:4] = probs.log()
    params = SamplingParams(temperature=1.0, top_p=0.5)  # mass above token 1 is 0.4 < 0.5; above token 2 is 0.7
    seen = {_one(row, params, seed, 0) for seed in range(300)}
    assert seen == {0, 1}


def test_samples_stay_inside_top_k():
    row = _logits(1, seed=3, scale=1.0)[0]
    k = 5
    allowed = set(torch.topk(row, k).indices.tolist())
    for temperature in (1.0, 10.0):
        params = SamplingParams(temperature=temperature, top_k=k)
        seen = [_one(row, params, seed, seed % 7) for seed in range(400)]
        assert set(seen) <= allowed
        assert len(set(seen)) == k  # at a high enough temperature every one of the k is drawn


def test_seeded_row_independent_of_batch_composition():
    target = _logits(1, seed=4, scale=1.0)[0]
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20)
    alone = [_one(target, params, 99, i) for i in range(20)]
    assert len(set(alone)) > 1
    others = _logits(5, seed=5)
    other_params = [
        GREEDY,
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=20),
        SamplingParams(temperature=2.0, top_k=3),
        SamplingParams(temperature=0.5, top_p=0.5),
    ]
    for i in range(20):
        for where in (0, 2, 5):
            rows = list(others)
            rows.insert(where, target)
            plist = list(other_params)
            plist.insert(where, params)
            seeds = [5, 6, 7, 8, 9, 10]
            seeds[where] = 99
            indices = [i + 3] * 6
            indices[where] = i
            assert sample(torch.stack(rows), plist, seeds, indices)[where] == alone[i]


def test_tiny_positive_temperature_is_greedy_and_does_not_poison_batch():
    logits = _logits(3, seed=6)
    params = [SamplingParams(temperature=1e-38), GREEDY, SamplingParams(temperature=1.0)]
    out = sample(logits, params, [1, 2, 3], [0, 0, 0])
    assert out[:2] == logits.argmax(-1).tolist()[:2]


def test_draws_follow_the_tempered_distribution():
    """One batched call of 4,000 rows (the same logits, token indices 0..3999): the
    frequencies follow softmax(logits / temperature) and ignore tokens at -inf."""
    probs = torch.tensor([0.5, 0.3, 0.2])
    row = torch.full((V,), -math.inf)
    row[:3] = probs.log()
    n = 4000
    for temperature in (1.0, 0.5):
        params = [SamplingParams(temperature=temperature)] * n
        out = torch.tensor(sample(row.expand(n, V).contiguous(), params, [7] * n, list(range(n))))
        assert out.max() < 3
        freq = torch.bincount(out, minlength=3).float() / n
        expect = torch.softmax(probs.log() / temperature, -1)
        assert (freq - expect).abs().max() < 0.03, (temperature, freq, expect)


def test_greedy_and_sampled_rows_mix_in_one_call():
    logits = _logits(6, seed=8)
    params = [GREEDY, SamplingParams(temperature=1.0, top_k=1), GREEDY,
              SamplingParams(temperature=0.7, top_p=0.8), GREEDY, SamplingParams(temperature=2.0)]
    out = sample(logits, params, list(range(6)), [3] * 6)
    argmax = logits.argmax(-1).tolist()
    assert [out[i] for i in (0, 1, 2, 4)] == [argmax[i] for i in (0, 1, 2, 4)]
    for i in (3, 5):  # each sampled row is what it would be alone
        assert out[i] == _one(logits[i], params[i], i, 3)
