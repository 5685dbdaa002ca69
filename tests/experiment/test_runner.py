"""`elastune experiment run` end to end in sim mode, `experiment report`, and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services import cli
from services.experiment.config import ConfigError, parse

REPO = Path(__file__).resolve().parents[2]

CONFIG = f"""
name: e2e
seed: 1
mode: sim
workload:
  kind: steps
  steps: [[0, 4.0], [20, 40.0], [70, 4.0]]
  duration_s: 110
  prompt_median: 64
  output_median: 32
  max_context: 1024
  max_output: 128
slo: {{ttft_s: 1.0, tpot_s: 0.1}}
runs: [static_peak, keda_threshold, elastic_tuned]
sim:
  profile: {REPO / "experiments/profiles/tiny-cpu.json"}
  gpus: 8
  interval_s: 2
  shared_host: false
policy:
  ema_half_life_s: 4
  scale_down_window_s: 20
"""


def test_experiment_run_writes_a_complete_results_folder(tmp_path, capsys):
    config = tmp_path / "e2e.yaml"
    config.write_text(CONFIG)
    assert cli.main(["experiment", "run", str(config), "--out", str(tmp_path / "out")]) == 0
    (folder,) = (tmp_path / "out").iterdir()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["seed"] == 1 and meta["commit"] and meta["machine"]["cpus"]
    assert meta["profile"]["name"] == "tiny-cpu" and meta["load_steps"] == [20.0, 70.0]
    assert (folder / "config.yaml").read_text() == CONFIG
    summary = json.loads((folder / "summary.json").read_text())["runs"]
    assert set(summary) == {"static_peak", "keda_threshold", "elastic_tuned"}
    for run in summary:
        assert (folder / "runs" / run / "records.csv.gz").exists()
        assert summary[run]["requests"] == meta["workload_summary"]["count"]
        assert summary[run]["failed"] == 0  # nothing accepted is lost, whatever the scaling
    # the load step makes the elastic run scale up and back down; static never scales
    pre = summary["elastic_tuned"]["stages"]["prefill"]
    assert pre["scale_events"] >= 2 and pre["max_replicas"] > 1 and len(pre["convergence_s"]) == 2
    assert all(st["scale_events"] == 0 for st in summary["static_peak"]["stages"].values())
    # static at peak is sized for the busiest minute: it meets the SLO
    assert summary["static_peak"]["slo_attainment"] > 0.99
    report = (folder / "report.md").read_text()
    assert "| elastic_tuned |" in report and "## Goals" in report
    for png in ("latency_cdf.png", "slo_attainment.png", "replicas_elastic_tuned.png"):
        assert (folder / png).read_bytes()[:4] == b"\x89PNG"
    # the report is re-made from the files alone
    (folder / "report.md").unlink()
    assert cli.main(["experiment", "report", str(folder)]) == 0
    assert (folder / "report.md").read_text() == report
    assert "elastic_tuned" in capsys.readouterr().out


@pytest.mark.parametrize("change, field", [
    ("runs: [static_peak, bogus]", "bogus"),
    ("mode: cluster", "mode"),
    ("slo: {ttft_s: 0, tpot_s: 0.1}", "slo.ttft_s"),
    ("sim: {gpus: lots}", "sim.gpus"),
    ("workload: {kind: trace, speed: 2}", "workload.speed"),
    ("real: {api: websocket}", "real.api"),
])
def test_bad_config_names_the_field(change, field):
    doc = {"name": "x", "runs": ["static_peak"]}
    import yaml

    doc.update(yaml.safe_load(change))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse(doc)


def test_cli_reports_a_bad_config_with_exit_code_2(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("name: x\nruns: [nope]\n")
    assert cli.main(["experiment", "run", str(config), "--out", str(tmp_path)]) == 2
    assert "unknown run 'nope'" in capsys.readouterr().err
