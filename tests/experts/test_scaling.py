"""Expert groups as scaling stages: the scaler's signals per group, and the synthetic expert load
(a dense model sending Zipf-skewed tokens to experts servers)."""

from __future__ import annotations

import asyncio

import torch

from services.common import keys
from services.common.load_report import LoadReport
from services.common.store import connect
from services.engine.loader import load_model
from services.experts.client import attach_remote_experts
from services.experts.synthetic import SyntheticExpertLoad, zipf_probs
from services.scaler.signal_source import stage_view

from .conftest import start_experts


def _report(stage: str, wid: str, **fields) -> LoadReport:
    return LoadReport(worker_id=wid, stage=stage, address="x:1", host_id="h", model="m", timestamp_unix=0.0, **fields)


def test_an_expert_group_is_scaled_on_the_tokens_routed_to_it_not_the_gateways_rate():
    gateway = _report("gateway", "gw", prompt_tokens_per_s=1000.0, output_tokens_per_s=500.0)
    hot = [_report("experts/g0", "a", prompt_tokens_per_s=900.0, queued_tokens=40),
           _report("experts/g0", "b", prompt_tokens_per_s=700.0)]
    view = stage_view("experts/g0", hot, [gateway], asked=2, now=0.0)
    assert view.signals.prompt_tokens_per_s == 1600.0 and view.signals.output_tokens_per_s == 0.0
    assert view.signals.ready_replicas == 2 and view.active
    # decode still follows the gateways' arrival rate
    decode = stage_view("decode", [_report("decode", "d", output_tokens_per_s=80.0)], [gateway], None, 0.0)
    assert decode.signals.output_tokens_per_s == 500.0


def test_zipf_probabilities():
    p = zipf_probs(8, 1.2)
    assert abs(float(p.sum()) - 1) < 1e-6 and bool((p[:-1] > p[1:]).all())
    assert torch.allclose(zipf_probs(4, 0.0), torch.full((4,), 0.25))


async def test_synthetic_expert_load_leaves_the_dense_model_exact_and_skews_the_groups(
    store_url, prefix, tiny_model, monkeypatch
):
    servers = await start_experts(store_url, prefix, "", ["g0", "g1"], num_groups=2, synthetic_experts=8,
                                  synthetic_hidden_size=192)
    monkeypatch.setenv("ELASTUNE_SYNTHETIC_ZIPF_S", "1.2")
    dense = load_model(tiny_model, dtype="float32")
    model = load_model(tiny_model, dtype="float32")
    remote = await attach_remote_experts(model, store_url, prefix)
    store = connect(store_url)
    try:
        assert all(isinstance(layer.mlp, SyntheticExpertLoad) for layer in model.layers)
        tokens = torch.randint(3, 4096, (4, 64), generator=torch.Generator().manual_seed(0))
        lengths = torch.tensor([64, 50, 33, 64])
        got, _ = await asyncio.to_thread(model.prefill, tokens, lengths)
        want, _ = dense.prefill(tokens, lengths)
        assert torch.equal(got, want)
        assert remote.calls >= 4  # 4 layers, at least one group each
        for _ in range(40):
            counts = {int(k): int(v) for k, v in (await store.hgetall(keys.expert_tokens(prefix))).items()}
            if sum(counts.values()) == 4 * 256 * 2:  # layers x tokens x top-2
                break
            await asyncio.sleep(0.1)
        assert sum(counts.values()) == 4 * 256 * 2
        assert counts[0] == max(counts.values()) and counts[0] > 3 * counts.get(7, 0)  # Zipf: expert 0 hottest
        g0 = servers[0].tokens_in.rate() * servers[0].tokens_in.window_s
        g1 = servers[1].tokens_in.rate() * servers[1].tokens_in.window_s
        assert g0 > 2 * g1  # experts 0-3 (g0) carry most of the load: g0 is the group to scale
    finally:
        await remote.stop()
        await store.aclose()
        for s in servers:
            await s.stop(0.5)


def test_scaler_metadata_group_key_names_the_expert_group():
    from services.scaler.metadata import MetadataError, parse_trigger

    assert parse_trigger({"stage": "experts", "group": "g1"}).stage == "experts/g1"
    assert parse_trigger({"stage": "experts/g1"}).stage == "experts/g1"
    try:
        parse_trigger({"stage": "experts", "group": "G_1"})
    except MetadataError as exc:
        assert "group='G_1'" in str(exc)
    else:
        raise AssertionError("a bad group must be refused")
