"""The sidecar's per-tick decision on hand-made reports and tables; share detection."""

from __future__ import annotations

import pytest

from services.common.load_report import LoadReport
from services.common.runtime_config import RuntimeConfig
from services.tuner.config import TunerConfig
from services.tuner.policy import TunerState, decide
from services.tuner.shares import ShareMechanism, detect_share
from services.tuner.table import ProfilePoint, TuningTable

SETTINGS = TunerConfig(worker="w:1", slo_decode_ms=50.0, min_dwell_s=10.0, hysteresis=0.05, settle_s=5.0,
                       observe_interval_s=10.0, explore_interval_s=100.0, explore_s=20.0, explore_margin=0.15)


def cfg(b: int) -> dict[str, int]:
    return {"max_batch_size": b, "max_concurrency": b}


def table(*rows: tuple[float, int, float, float]) -> TuningTable:
    t = TuningTable()
    for share, b, thr, p95 in rows:
        t.add(ProfilePoint("m", "decode", "cpu", share, cfg(b), thr, p95 * 0.8, p95, samples=5,
                           workload={"context_len": 64}))
    return t


def report(b: int, share: float = 1.0, running: int = 2, rate: float = 100.0, p50: float = 10.0,
           p95: float = 12.0) -> LoadReport:
    return LoadReport("w", "decode", "w:1", "h", "m", 0.0, running_seqs=running, kv_used_tokens=70 * running,
                      output_tokens_per_s=rate, step_ms_p50=p50, step_ms_p95=p95, gpu_share=share,
                      config=RuntimeConfig(b, b))


TABLE = table((1.0, 4, 1000.0, 10.0), (1.0, 16, 2000.0, 20.0), (1.0, 64, 3000.0, 80.0),
              (0.5, 4, 900.0, 12.0), (0.5, 16, 1100.0, 45.0), (0.5, 64, 1200.0, 150.0))


def test_first_tick_picks_the_best_within_slo_and_then_keeps_it() -> None:
    state = TunerState()
    d = decide(report(4), TABLE, SETTINGS, state, 1.0, "cpu", now=0.0)
    assert (d.apply, d.reason) == (cfg(16), "best")  # batch 64 breaks the 50 ms SLO
    state.applied(d.apply, 0.0)
    d = decide(report(16), TABLE, SETTINGS, state, 1.0, "cpu", now=1.0)
    assert d.apply is None and d.reason == "kept"


def test_share_change_switches_at_once_despite_dwell_and_hysteresis() -> None:
    state = TunerState()
    state.applied(decide(report(4), TABLE, SETTINGS, state, 1.0, "cpu", now=0.0).apply, 0.0)
    sticky = TunerConfig(**{**SETTINGS.__dict__, "hysteresis": 100.0, "min_dwell_s": 1e9})
    d = decide(report(16, share=0.5), TABLE, sticky, state, 0.5, "cpu", now=0.5)
    # at 0.5 batch 16 still meets the SLO (45 ms) and beats batch 4 by 22%: it stays...
    assert (d.apply, d.reason) == (None, "share_change")
    d = decide(report(16, share=0.3), TABLE, sticky, state, 0.3, "cpu", now=0.6)
    # ...at 0.3 (estimated from 0.5 downwards) batch 16 would take 75 ms: batch 4 at once
    assert (d.apply, d.reason) == (cfg(4), "share_change")


def test_an_improvement_waits_for_the_dwell_time_but_a_broken_slo_does_not() -> None:
    t = table((1.0, 4, 1000.0, 10.0), (1.0, 16, 1500.0, 20.0))
    state = TunerState()
    state.applied(cfg(4), 0.0)
    state.share = 1.0
    d = decide(report(4), t, SETTINGS, state, 1.0, "cpu", now=3.0)
    assert d.apply is None and d.reason == "dwell"
    d = decide(report(4), t, SETTINGS, state, 1.0, "cpu", now=11.0)
    assert d.apply == cfg(16)
    state.applied(cfg(16), 11.0)
    worse = table((1.0, 4, 1000.0, 10.0), (1.0, 16, 1500.0, 90.0))  # batch 16 now breaks the SLO
    d = decide(report(16), worse, SETTINGS, state, 1.0, "cpu", now=12.0)
    assert d.apply == cfg(4)


def test_exploration_is_bounded_and_leaves_at_once_on_an_slo_break() -> None:
    t = table((1.0, 4, 1000.0, 10.0), (1.0, 8, 1900.0, 15.0), (1.0, 16, 2000.0, 20.0), (1.0, 32, 1000.0, 30.0))
    state = TunerState()
    state.applied(decide(report(4), t, SETTINGS, state, 1.0, "cpu", now=0.0).apply, 0.0)
    assert decide(report(16), t, SETTINGS, state, 1.0, "cpu", now=5.0).reason == "kept"  # within the dwell
    d = decide(report(16), t, SETTINGS, state, 1.0, "cpu", now=50.0)
    assert (d.apply, d.reason) == (cfg(8), "explore")  # within 15% of the best; batch 4 and 32 are not
    state.applied(d.apply, 50.0, explore_s=SETTINGS.explore_s)
    assert decide(report(8), t, SETTINGS, state, 1.0, "cpu", now=60.0).reason == "explore"
    d = decide(report(8, p95=70.0), t, SETTINGS, state, 1.0, "cpu", now=61.0)  # observed p95 over the SLO
    assert d.apply == cfg(16)
    state.applied(d.apply, 61.0)
    assert decide(report(16), t, SETTINGS, state, 1.0, "cpu", now=120.0).reason == "kept"  # once per interval
    # Explored already: the next interval has nothing left to try near the best.
    assert decide(report(16), t, SETTINGS, state, 1.0, "cpu", now=300.0).reason == "kept"


def test_online_observation_needs_a_settled_full_batch_and_is_rate_limited() -> None:
    state = TunerState()
    state.applied(decide(report(4), TABLE, SETTINGS, state, 1.0, "cpu", now=0.0).apply, 0.0)
    assert decide(report(16, running=20), TABLE, SETTINGS, state, 1.0, "cpu", now=2.0).observation is None  # settling
    assert decide(report(16, running=3), TABLE, SETTINGS, state, 1.0, "cpu", now=6.0).observation is None  # not full
    obs = decide(report(16, running=20, p50=8.0, p95=9.0), TABLE, SETTINGS, state, 1.0, "cpu", now=7.0).observation
    assert obs is not None
    assert (obs.source, obs.config, obs.share, obs.workload) == ("online", cfg(16), 1.0, {"context_len": 64})
    assert obs.throughput_tokens_per_s == pytest.approx(16 * 1000 / 8.0)
    assert (obs.latency_p50_ms, obs.latency_p95_ms) == (8.0, 9.0)
    assert decide(report(16, running=20), TABLE, SETTINGS, state, 1.0, "cpu", now=12.0).observation is None
    assert decide(report(16, running=20), TABLE, SETTINGS, state, 1.0, "cpu", now=17.5).observation is not None


def test_no_profile_for_the_model_changes_nothing() -> None:
    d = decide(report(4), TuningTable(), SETTINGS, TunerState(), 1.0, "cpu", now=0.0)
    assert (d.apply, d.reason) == (None, "no_profile")


def test_share_detection_and_share_environments() -> None:
    assert detect_share({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"}, reported=1.0) == pytest.approx(0.3)
    assert detect_share({"ELASTUNE_MIG_PROFILE": "3g.40gb"}) == pytest.approx(3 / 7)
    assert detect_share({}, reported=0.5) == 0.5
    assert detect_share({"ELASTUNE_THREADS": "1"}, cores=4) == 0.25
    assert detect_share({}) == 1.0
    with pytest.raises(ValueError, match="CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"):
        detect_share({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "0"})
    with pytest.raises(ValueError, match="MIG profile"):
        detect_share({"ELASTUNE_MIG_PROFILE": "big"})
    cpu = ShareMechanism("cpu", (0, 1, 2, 3))
    assert cpu.grid() == [0.25, 0.5, 0.75, 1.0]
    assert cpu.child_env(0.5)["ELASTUNE_THREADS"] == "2"
    mps = ShareMechanism("mps")
    assert mps.grid(0.25) == [0.25, 0.5, 0.75, 1.0]
    assert mps.child_env(0.3)["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    for share in mps.grid(0.1):  # every MPS share round-trips through the environment
        assert detect_share(mps.child_env(share)) == pytest.approx(share)


def test_a_cpu_share_pins_the_process_to_that_many_cores_and_threads() -> None:
    import os

    import torch

    cores = tuple(sorted(os.sched_getaffinity(0)))
    before = (set(cores), torch.get_num_threads())
    try:
        mechanism = ShareMechanism("cpu", cores)
        mechanism.apply_in_process(1 / len(cores))
        assert os.sched_getaffinity(0) == {cores[0]}
        assert torch.get_num_threads() == 1
    finally:
        os.sched_setaffinity(0, before[0])
        torch.set_num_threads(before[1])
