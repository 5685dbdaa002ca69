"""The adaptive profiler on a hand-made profile, and the real probe processes on the tiny model."""

from __future__ import annotations

import json
import math
import uuid

import pytest

from services.cli import main as cli_main
from services.tuner.knee import find_knee
from services.tuner.probe import Measurement, ProbeItem
from services.tuner.profiler import ProfileGrid, profile
from services.tuner.selection import choose
from services.tuner.shares import ShareMechanism
from services.tuner.table import TuningTable
from tests.tuner.test_commands import stored

SHARES = ShareMechanism("mps").grid(0.1)  # 0.1 .. 1.0
GRID = ProfileGrid()


def knee_of(item: ProbeItem) -> float:
    """Hand-made: a decode step's knee grows with the batch (memory-bound at batch 1), longer
    contexts move it a little; prefill is compute-bound and slows almost with the share."""
    b = item.config["max_batch_size"]
    if item.stage == "decode":
        return min(1.0, 0.15 + 0.12 * math.log2(b) + 0.02 * math.log2(item.workload["context_len"] / 64))
    return min(1.0, 0.7 + 0.04 * math.log2(b))


def true_figures(share: float, item: ProbeItem) -> tuple[float, float]:
    """(throughput tokens/s, p95 ms) of the hand-made profile."""
    b = item.config["max_batch_size"]
    slowdown = 1.0 / min(1.0, share / knee_of(item)) ** 0.8
    if item.stage == "decode":
        step_ms = (4.0 + 0.35 * b * (item.workload["context_len"] / 64) ** 0.5) * slowdown
        return b * 1000.0 / step_ms, step_ms * 1.1
    batch_ms = (2.0 + 0.05 * b * item.workload["prompt_len"]) * slowdown
    return b * item.workload["prompt_len"] * 1000.0 / batch_ms, batch_ms * 1.1


class HandMade:
    def __init__(self) -> None:
        self.calls: list[tuple[float, int]] = []

    def __call__(self, share, items):
        self.calls.append((share, len(items)))
        out = []
        for item in items:
            thr, p95 = true_figures(share, item)
            out.append(Measurement(item, thr, p95 / 1.1, p95, 5))
        return out


def test_knees_match_the_full_grid_at_a_fraction_of_its_cost() -> None:
    measure = HandMade()
    result = profile(GRID, SHARES, measure, "m", "H100")
    assert result.full_grid_measurements == len(GRID.items()) * len(SHARES) == 160
    assert result.measurements < 0.7 * result.full_grid_measurements
    assert result.processes == len(measure.calls) <= 3 * len(SHARES)  # one process per share and round
    knees = {(k["stage"], k["batch"], json.dumps(k["workload"])): k["knee"] for k in result.knees}
    for item in GRID.items():
        curve = [(s, true_figures(s, item)[0]) for s in SHARES]
        assert knees[(item.stage, item.config["max_batch_size"], json.dumps(item.workload))] == find_knee(curve, 0.05)
    decode_64 = [k for k in result.knees if k["stage"] == "decode" and k["workload"] == {"context_len": 64}]
    by_batch = {k["batch"]: k["knee"] for k in decode_64}
    assert by_batch[1] < by_batch[4] < by_batch[64]  # the knee moves with the batch size


@pytest.mark.parametrize("slo_scale", [0.6, 1.0, 3.0])
def test_selected_configs_are_within_5_percent_of_exhaustive_search_at_every_share(slo_scale: float) -> None:
    def slo_of(stage: str) -> float:
        # An SLO that the largest batches miss at small shares, so the choice depends on the share.
        items = [i for i in GRID.items() if i.stage == stage]
        return slo_scale * true_figures(1.0, max(items, key=lambda i: i.config["max_batch_size"]))[1]

    grid = ProfileGrid(slo_prefill_ms=slo_of("prefill"), slo_decode_ms=slo_of("decode"))
    result = profile(grid, SHARES, HandMade(), "m", "H100")
    assert result.measurements < 0.8 * result.full_grid_measurements
    table = result.table
    checked = 0
    for stage, workload_key in (("decode", "context_len"), ("prefill", "prompt_len")):
        lens = GRID.context_lens if stage == "decode" else GRID.prompt_lens
        items = [i for i in GRID.items() if i.stage == stage]
        slo = slo_of(stage)
        for n in lens:
            mine = [i for i in items if i.workload[workload_key] == n]
            for share in SHARES:
                truth = {json.dumps(i.config, sort_keys=True): true_figures(share, i) for i in mine}
                feasible = [thr for thr, p95 in truth.values() if p95 <= slo]
                rows = table.points_at("m", stage, "H100", share, {workload_key: n})
                assert len(rows) == len(mine)
                picked = choose(rows, 0.0, slo)
                thr, p95 = truth[json.dumps(picked.config, sort_keys=True)]
                if not feasible:
                    assert picked.reason == "no_config_meets_slo"
                    continue
                assert p95 <= slo * 1.0001, (stage, n, share, picked)
                assert thr >= 0.95 * max(feasible), (stage, n, share, picked.config, thr, max(feasible))
                checked += 1
    assert checked >= 20  # most (stage, length, share) have a config within the SLO


def test_probe_processes_measure_the_tiny_model_and_write_store_and_export(tmp_path, tiny_model, store_url,
                                                                           capsys) -> None:
    prefix = f"test-profile-{uuid.uuid4().hex[:8]}"
    out, report = tmp_path / "table.json", tmp_path / "report.json"
    code = cli_main(["profile", "--model", str(tiny_model), "--shares", "0.5", "--prefill-batches", "1,2",
                     "--prompt-lens", "16", "--decode-batches", "1,4", "--context-lens", "16", "--reps", "3",
                     "--out", str(out), "--report", str(report), "--store", store_url, "--prefix", prefix])
    assert code == 0
    assert "cost: 4 measurements in 1 processes" in capsys.readouterr().out
    exported = TuningTable.import_file(str(out))
    points = exported.all_points()
    assert {(p.stage, p.batch) for p in points} == {("prefill", 1), ("prefill", 2), ("decode", 1), ("decode", 4)}
    for p in points:
        assert (p.model, p.device, p.share, p.source) == (tiny_model.name, "cpu", 0.5, "profile")
        assert p.throughput_tokens_per_s > 0 and 0 < p.latency_p50_ms <= p.latency_p95_ms
    decode = {p.batch: p for p in points if p.stage == "decode"}
    assert decode[4].throughput_tokens_per_s > decode[1].throughput_tokens_per_s  # batching pays on decode
    knees = json.loads(report.read_text())
    assert knees["cost"]["processes"] == 1 and len(knees["knees"]) == 4

    table = stored(store_url, prefix)
    assert sorted(p.row_key() for p in table.all_points()) == sorted(p.row_key() for p in points)


def test_profile_rejects_a_bad_grid(capsys) -> None:
    assert cli_main(["profile", "--shares", "1.5"]) == 2
    assert "shares must be in (0, 1]" in capsys.readouterr().err
