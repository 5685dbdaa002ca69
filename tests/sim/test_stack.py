"""The profile's stack block: per-request and per-step overheads, and CPU contention on a shared host
(hand-made cases whose timings can be worked out on paper)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.sim.profile import DecodeModel, PrefillModel, Profile, StackModel, load_profile, profile_from_dict
from services.sim.simulator import SimConfig, Simulator, simulate

from .test_simulator import plans, static

PROFILES = Path(__file__).resolve().parents[2] / "experiments" / "profiles"
DECODE_10MS = DecodeModel(weight_ms=10.0, kv_ms_per_token=0.0, compute_ms_per_seq=0.0, combine="sum",
                          max_batch_size=64, kv_capacity_tokens=10**6)
PREFILL_10MS = PrefillModel(overhead_ms=10.0, ms_per_token=0.0, max_batch_size=1)


def stacked(stack: StackModel) -> Profile:
    return Profile("test", "hand-made", "cpu", PREFILL_10MS, DECODE_10MS, 0.0, {"prefill": 0.0, "decode": 0.0}, stack)


def run(stack: StackModel, arrivals: list[float], outputs: list[int]):
    cfg = SimConfig(stacked(stack), static(), plans(decode_batch=64), gpus=4, interval_s=60.0)
    return simulate(cfg, arrivals, [8] * len(arrivals), outputs)


def test_slowdown_is_processor_sharing_beyond_the_host_cores():
    host = StackModel(host_cores=2.0)
    assert host.slowdown(busy_share=1.0, background_cores=0.5) == 1.0  # fits in 2 cores
    assert host.slowdown(busy_share=2.0, background_cores=1.0) == pytest.approx(1.5)
    assert host.slowdown(busy_share=4.0, background_cores=0.0) == pytest.approx(2.0)
    assert StackModel().slowdown(busy_share=50.0, background_cores=9.0) == 1.0  # no shared host: own devices


def test_background_load_grows_with_request_and_token_rates():
    stack = StackModel(background_cores=0.1, cpu_ms_per_request=20.0, cpu_ms_per_token=1.0)
    assert stack.background(0.0, 0.0) == pytest.approx(0.1)
    assert stack.background(10.0, 100.0) == pytest.approx(0.1 + 0.2 + 0.1)


def test_stack_block_parses_and_rejects_negative_numbers():
    data = json.loads((PROFILES / "h100-llama3-8b.json").read_text())
    data["stack"] = {"request_overhead_ms": 12.5, "host_cores": 2, "cpu_ms_per_token": 0.4, "source": "x"}
    stack = profile_from_dict(data).stack
    assert (stack.request_overhead_ms, stack.host_cores, stack.cpu_ms_per_token, stack.step_overhead_ms) == (
        12.5, 2.0, 0.4, 0.0)
    assert stack.shared_host
    data["stack"]["step_overhead_ms"] = -1
    with pytest.raises(ValueError, match="stack.step_overhead_ms"):
        profile_from_dict(data)


def test_h100_profile_has_no_stack_overheads_and_no_shared_host():
    """The cluster profile keeps its pods on their own GPU shares: the local-stack calibration must not leak."""
    assert load_profile(PROFILES / "h100-llama3-8b.json").stack == StackModel()


def test_tiny_profile_is_calibrated_for_its_shared_host():
    data = json.loads((PROFILES / "tiny-cpu.json").read_text())
    stack = load_profile(PROFILES / "tiny-cpu.json").stack
    assert stack.shared_host and stack.host_cores == data["machine"]["cpus"]
    assert stack.request_overhead_ms == pytest.approx(data["stack"]["measured"]["ttft_extra_ms"]["median"])
    assert data["stack"]["source"].startswith("measured")


def test_request_overhead_delays_the_first_token_and_step_overhead_each_step():
    data = run(StackModel(request_overhead_ms=50.0, step_overhead_ms=2.0), [0.0], [11])
    assert data.ttft_s == pytest.approx([0.060])  # 10 ms prefill + 50 ms of stack
    assert data.e2e_s == pytest.approx([0.060 + 10 * 0.012])  # 10 decode steps of 10 + 2 ms


def test_prefill_beside_a_busy_decode_pod_slows_on_one_core_but_not_on_two():
    # Request 0: prefill 0-10 ms alone, then decodes 20 steps (10 ms each) until ~210 ms. Request 1
    # arrives at 15 ms: its prefill shares the host with the busy decode pod.
    arrivals, outputs = [0.0, 0.015], [21, 2]
    one = run(StackModel(host_cores=1.0), arrivals, outputs)
    assert one.ttft_s == pytest.approx([0.010, 0.020])  # (1 + 1) / 1 core: twice as long
    two = run(StackModel(host_cores=2.0), arrivals, outputs)
    assert two.ttft_s == pytest.approx([0.010, 0.010])
    assert run(StackModel(), arrivals, outputs).ttft_s == pytest.approx([0.010, 0.010])


def test_background_cpu_slows_prefill_and_decode_alike():
    data = run(StackModel(host_cores=1.0, background_cores=0.5), [0.0], [11])
    assert data.ttft_s == pytest.approx([0.015])  # (1 + 0.5) / 1 core
    assert data.e2e_s == pytest.approx([0.015 + 10 * 0.015])



def test_a_cold_starting_pod_burns_host_cpu():
    stack = StackModel(host_cores=1.0, starting_cpu=1.0)
    sim = Simulator(SimConfig(stacked(stack), static(), plans(), gpus=4), [], [], [])
    sim.run()  # places the warm pods (1 prefill, 1 decode), both idle
    (prefill,) = sim.pods["prefill"]
    assert sim._slowdown(prefill, 0.0) == 1.0  # alone on the core
    starting = sim._add_pod("decode", 0.0)  # cold start: placed, not ready
    assert starting.state == "starting" and starting.gpu is not None
    assert sim._slowdown(prefill, 0.0) == pytest.approx(2.0)  # shares the core with the start-up
