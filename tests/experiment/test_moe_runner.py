"""`elastune experiment run` with the config's `moe:` block: expert groups as stages of a sim run,
their replicas and GPU-seconds in the summary and the report, and the block's config errors."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from services import cli
from services.experiment.baselines import demand, sim_config
from services.experiment.config import ConfigError, load, parse
from services.experiment.metrics import Slo, summarize
from services.experiment.workload import build
from services.sim.control import StageControl
from services.sim.profile import load_profile
from services.sim.simulator import simulate

REPO = Path(__file__).resolve().parents[2]
GROUPS = ("experts/g0", "experts/g1", "experts/g2", "experts/g3")

CONFIG = f"""
name: moe-e2e
seed: 3
mode: sim
workload:
  kind: steps
  steps: [[0, 2.0], [20, 12.0], [60, 2.0]]
  duration_s: 100
  prompt_median: 64
  output_median: 32
  max_context: 1024
  max_output: 128
slo: {{ttft_s: 2.0, tpot_s: 0.25}}
runs: [static_peak, elastic]
moe: {{experts: 8, top_k: 2, groups: 4, skew: 1.2}}
sim:
  profile: {REPO / "experiments/profiles/tiny-cpu.json"}
  gpus: 64
  interval_s: 2
  shared_host: false
policy:
  ema_half_life_s: 2
  scale_up_cooldown_s: 2
  scale_down_cooldown_s: 5
  scale_down_window_s: 10
"""


def test_moe_run_reports_expert_groups_beside_prefill_and_decode(tmp_path):
    config = tmp_path / "moe.yaml"
    config.write_text(CONFIG)
    assert cli.main(["experiment", "run", str(config), "--out", str(tmp_path / "out")]) == 0
    (folder,) = (tmp_path / "out").iterdir()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["stages"] == ["prefill", "decode", *GROUPS]
    shares = meta["moe"]["pair_share"]
    assert shares["experts/g0"] > shares["experts/g3"] and sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    runs = json.loads((folder / "summary.json").read_text())["runs"]
    for run, s in runs.items():
        assert s["failed"] == 0, run
        # every stage's GPU-seconds are its own and together they are the run's
        assert set(s["stages"]) == {"prefill", "decode", *GROUPS}
        assert sum(st["gpu_seconds"] for st in s["stages"].values()) == pytest.approx(s["gpu_seconds"], rel=1e-6)
        assert all(s["stages"][g]["gpu_seconds"] > 0 for g in GROUPS)
    # static never scales a group; elastic scales the hot group on its routed pairs, and more than the cold one
    assert all(runs["static_peak"]["stages"][g]["scale_events"] == 0 for g in GROUPS)
    hot, cold = runs["elastic"]["stages"]["experts/g0"], runs["elastic"]["stages"]["experts/g3"]
    assert hot["max_replicas"] > 1 and hot["scale_events"] >= 2
    assert hot["mean_replicas"] > cold["mean_replicas"] and hot["gpu_seconds"] > cold["gpu_seconds"]
    report = (folder / "report.md").read_text()
    assert "## Replicas and GPU-seconds by stage" in report and "- MoE: 8 experts, top-2" in report
    assert "experts/g0 replicas mean (max) / GPU-s" in report
    assert (folder / "replicas_elastic.png").read_bytes()[:4] == b"\x89PNG"
    # the per-stage split is saved with the run: the report re-made from the files is the same
    (folder / "report.md").unlink()
    assert cli.main(["experiment", "report", str(folder)]) == 0
    assert (folder / "report.md").read_text() == report


@pytest.mark.parametrize("moe, field", [
    ({"experts": 4, "top_k": 5}, "top_k"),
    ({"experts": 4, "groups": 5}, "groups"),
    ({"experts": 8, "slo_fraction": 0}, r"moe\.slo_fraction"),
    ({"experts": 8, "routing": "zipf"}, r"moe\.routing"),
])
def test_bad_moe_block_names_the_field(moe, field):
    with pytest.raises(ConfigError, match=field):
        parse({"name": "x", "runs": ["static_peak"], "mode": "sim", "moe": moe})


def test_moe_is_sim_only_and_off_by_default():
    with pytest.raises(ConfigError, match="moe"):
        parse({"name": "x", "runs": ["static_peak"], "mode": "real", "moe": {"experts": 8}})
    assert not parse({"name": "x", "runs": ["static_peak"]}).moe.on
    assert not parse(yaml.safe_load("name: x\nruns: [static_peak]\nmoe: {experts: 0}\n")).moe.on


def test_static_peak_is_sized_for_loaded_experts_and_meets_the_slo_where_idle_sizing_does_not():
    cfg = load(REPO / "experiments/moe-skew.yaml")  # 12 req/s for two minutes: the groups are busy
    requests = build(cfg.workload, cfg.seed)
    profile = load_profile(cfg.sim.profile)
    profile = replace(profile, stack=replace(profile.stack, host_cores=0.0))
    need = demand(requests)
    setup = sim_config(cfg, "static_peak", profile, need)
    columns = ([r.arrival_s for r in requests], [r.prompt_tokens for r in requests],
               [r.output_tokens for r in requests])
    util = cfg.sim.target_utilization

    def attainment(controls) -> float:
        data = simulate(replace(setup, controls=controls), *columns)
        return summarize(data, Slo(cfg.slo_ttft_s, cfg.slo_tpot_s), stages=tuple(controls))["slo_attainment"]

    # prefill and decode sized for their peak at idle-expert capacity (the sizing before), groups as planned
    idle = {s: max(math.ceil(need.peak[s] / (setup.plans[s].tokens_per_s * util)), 1) if s in ("prefill", "decode")
            else c.replicas for s, c in setup.controls.items()}
    planned = {s: c.replicas for s, c in setup.controls.items()}
    assert all(c.min_replicas == c.max_replicas == c.replicas for c in setup.controls.values())
    assert planned["decode"] > idle["decode"]  # decode steps wait on loaded groups: more pods
    assert all(planned[g] >= 1 for g in GROUPS)
    static = {s: StageControl("static", replicas=n, min_replicas=n, max_replicas=n) for s, n in idle.items()}
    assert attainment(static) < 0.8
    assert attainment(setup.controls) >= 0.95


def test_a_static_moe_plan_larger_than_the_cluster_is_shrunk_to_fit_it():
    cfg = load(REPO / "experiments/moe-skew.yaml")
    requests = build(cfg.workload, cfg.seed)
    profile = load_profile(cfg.sim.profile)
    need = demand(requests)
    roomy = sim_config(cfg, "static_peak", profile, need)
    wanted = sum(c.replicas for c in roomy.controls.values())
    small = replace(cfg, sim=replace(cfg.sim, gpus=wanted - 3))
    fitted = sim_config(small, "static_peak", profile, need).controls
    assert sum(c.replicas for c in fitted.values()) <= small.sim.gpus  # whole-GPU pods: one GPU each
    assert all(c.replicas >= 1 for c in fitted.values())  # every stage, expert groups included, gets a pod
