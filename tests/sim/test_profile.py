"""Profiles: the service-time models, and that the shipped profiles match what they were made from."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from services.sim.profile import DecodeModel, load_profile, profile_from_dict
from services.sim.window import Window

PROFILES = Path(__file__).resolve().parents[2] / "experiments" / "profiles"


@pytest.mark.parametrize("batch, share, ms", [(1, 1.0, 5.5), (1, 0.5, 5.7), (1, 0.3, 6.5), (1, 0.1, 10.2),
                                              (256, 0.75, 7.6), (256, 0.5, 10.5)])
def test_h100_profile_reproduces_the_design_figures_it_is_derived_from(batch, share, ms):
    """DESIGN.md section 4: the GEMM-chain decode step measured alone on the GPU under MPS."""
    decode = load_profile(PROFILES / "h100-llama3-8b.json").decode
    alone = replace(decode, shared_bandwidth=False)  # the measurement had the GPU to itself
    assert alone.step_ms(batch, 0, share) == pytest.approx(ms, rel=0.15)


def test_packed_pods_split_memory_bandwidth():
    decode = load_profile(PROFILES / "h100-llama3-8b.json").decode
    # alone at half the SMs a memory-bound step barely slows; beside another pod it gets half the bandwidth
    assert decode.step_ms(1, 0, 0.5) == pytest.approx(0.5 + 5.0 / 0.5)
    assert decode.step_ms(1, 0, 1.0) == pytest.approx(5.5)


def test_tiny_profile_fits_its_own_samples():
    data = json.loads((PROFILES / "tiny-cpu.json").read_text())
    profile = profile_from_dict(data)
    for row in data["samples"]["decode"]:
        got = profile.decode.step_ms(row["batch"], row["batch"] * row["context"], 1.0)
        assert got == pytest.approx(row["ms"], rel=data["fit"]["decode_max_rel_error"] + 1e-6)
    for row in data["samples"]["prefill"]:
        b, t = row["batch"], row["length"]
        got = profile.prefill.batch_ms(b * t, b * t * t, b, 1.0)
        assert got == pytest.approx(row["ms"], rel=data["fit"]["prefill_max_rel_error"] + 1e-6)
    # a pod's share of a core slows every term in proportion
    assert profile.decode.step_ms(8, 800, 0.5) == pytest.approx(2 * profile.decode.step_ms(8, 800, 1.0))


def test_a_profile_missing_a_field_names_it():
    data = json.loads((PROFILES / "tiny-cpu.json").read_text())
    del data["decode"]["weight_ms"]
    with pytest.raises(ValueError, match="weight_ms"):
        profile_from_dict(data)
    with pytest.raises(ValueError, match="combine"):
        DecodeModel(1.0, 0.0, 0.0, combine="avg")


def test_window_rate_and_weighted_quantile():
    w = Window(10.0)
    w.add(0.0, 100.0)
    w.add(5.0, 0.01, weight=99)
    w.add(6.0, 1.0, weight=1)
    assert w.rate(6.0) == pytest.approx((100 + 0.99 + 1.0) / 10)
    assert w.quantile(6.0, 0.5) == pytest.approx(0.01)
    assert w.rate(10.5) == pytest.approx(1.99 / 10)  # the sample at 0 left the window
    assert w.quantile(30.0, 0.5) is None
