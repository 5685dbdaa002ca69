"""The profiler's experts stage: expert micro-batch x call size x share, knees per micro-batch, on
a hand-made profile and with real probe processes on the tiny MoE model."""

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

SHARES = ShareMechanism("mps").grid(0.1)
GRID = ProfileGrid(stages=("experts",))


def truth(share: float, item: ProbeItem) -> tuple[float, float]:
    """Hand-made (routed tokens/s, p95 ms of one micro-batch): a micro-batch's matmuls fill more
    of the device the larger it is, so its knee grows with it; each piece costs a fixed 0.3 ms."""
    m, n = item.config["max_batch_size"], item.workload["call_tokens"]
    knee = min(1.0, 0.1 + 0.08 * math.log2(m))
    piece_ms = (0.3 + 0.01 * m) / min(1.0, share / knee) ** 0.9
    return n / (math.ceil(n / m) * piece_ms) * 1000.0, piece_ms * 1.2


def hand_made(share, items):
    return [Measurement(i, *(lambda t, p: (t, p / 1.2, p))(*truth(share, i)), 5) for i in items]


def test_grid_items_and_validation() -> None:
    items = GRID.items()
    assert {(i.config["max_batch_size"], i.workload["call_tokens"]) for i in items} == {
        (16, 256), (64, 256), (256, 256), (16, 1024), (64, 1024), (256, 1024), (1024, 1024)}
    assert all(i.stage == "experts" for i in items)
    assert {i.stage for i in ProfileGrid(stages=("prefill", "experts")).items()} == {"prefill", "experts"}
    with pytest.raises(ValueError, match="none <= the call size 8"):
        ProfileGrid(stages=("experts",), experts_micro_batches=(16,), experts_call_tokens=(8, 64)).validate()
    with pytest.raises(ValueError, match="experts_micro_batches must be >= 1"):
        ProfileGrid(stages=("experts",), experts_micro_batches=(0, 4)).validate()
    with pytest.raises(ValueError, match="stages must be some of prefill, decode, experts"):
        ProfileGrid(stages=("router",)).validate()


def test_experts_knees_per_micro_batch_match_the_full_grid_and_selection_meets_the_slo() -> None:
    slo = 2.5  # ms per micro-batch: 256 and 1024 always miss it, 64 below a share of 0.3
    result = profile(ProfileGrid(stages=("experts",), slo_experts_ms=slo), SHARES, hand_made, "moe", "H100")
    assert result.full_grid_measurements == 7 * len(SHARES)
    assert result.measurements < 0.8 * result.full_grid_measurements
    for k in result.knees:
        item = ProbeItem("experts", {"max_batch_size": k["batch"]}, k["workload"])
        assert k["stage"] == "experts"
        assert k["knee"] == find_knee([(s, truth(s, item)[0]) for s in SHARES], 0.05)
    knees = {k["batch"]: k["knee"] for k in result.knees if k["workload"] == {"call_tokens": 1024}}
    assert knees[16] < knees[64] < knees[256] < knees[1024]  # the knee moves with the micro-batch
    chosen = {}
    for share in SHARES:
        rows = result.table.points_at("moe", "experts", "H100", share, {"call_tokens": 1024})
        assert {p.stage for p in rows} == {"experts"} and len(rows) == 4
        picked = choose(rows, 0.0, slo)
        feasible = {m: truth(share, ProbeItem("experts", {"max_batch_size": m}, {"call_tokens": 1024}))
                    for m in (16, 64, 256, 1024)}
        best = max(t for t, p95 in feasible.values() if p95 <= slo)
        thr, p95 = feasible[picked.config["max_batch_size"]]
        assert p95 <= slo * 1.0001 and thr >= 0.95 * best, (share, picked)
        chosen[share] = picked.config["max_batch_size"]
    assert chosen[0.1] == 16 and chosen[1.0] == 64  # the best micro-batch depends on the share


def test_probe_processes_profile_the_tiny_moe_experts_into_the_store(tmp_path, tiny_moe_model, store_url,
                                                                     capsys) -> None:
    prefix = f"test-profile-{uuid.uuid4().hex[:8]}"
    out, report = tmp_path / "table.json", tmp_path / "report.json"
    # No --stages: an MoE model directory gets the experts stage beside prefill and decode.
    code = cli_main(["profile", "--model", str(tiny_moe_model), "--shares", "0.5", "--prefill-batches", "1",
                     "--prompt-lens", "8", "--decode-batches", "1", "--context-lens", "8",
                     "--experts-micro-batches", "4,64", "--experts-call-tokens", "64", "--reps", "5",
                     "--out", str(out), "--report", str(report), "--store", store_url, "--prefix", prefix])
    assert code == 0
    printed = capsys.readouterr().out
    assert "experts  call_tokens=64" in printed
    everything = TuningTable.import_file(str(out)).all_points()
    assert {p.stage for p in everything} == {"prefill", "decode", "experts"}
    points = [p for p in everything if p.stage == "experts"]
    assert {(p.stage, p.batch, p.share) for p in points} == {("experts", 4, 0.5), ("experts", 64, 0.5)}
    for p in points:
        assert (p.model, p.device, p.source, p.workload) == (tiny_moe_model.name, "cpu", "profile", {"call_tokens": 64})
        assert p.throughput_tokens_per_s > 0 and 0 < p.latency_p50_ms <= p.latency_p95_ms and p.samples >= 3
    at_half = {p.batch: p for p in points}
    # 16 pieces of 4 routed tokens pay the per-expert-pass overhead 16 times: far fewer tokens/s
    # than one 64-token pass, but each piece holds the device for less time (fewer experts).
    assert at_half[64].throughput_tokens_per_s > at_half[4].throughput_tokens_per_s
    assert at_half[4].latency_p50_ms < at_half[64].latency_p50_ms
    knees = [k for k in json.loads(report.read_text())["knees"] if k["stage"] == "experts"]
    assert sorted((k["stage"], k["batch"]) for k in knees) == [("experts", 4), ("experts", 64)]
    assert all(k["knee"] == 0.5 and k["measured_shares"] == [0.5] for k in knees)  # one share: one process
    assert "cost: 4 measurements in 1 processes" in printed

    table = stored(store_url, prefix)
    assert table.shares(tiny_moe_model.name, "experts", "cpu") == [0.5]
    assert len(table.all_points()) == len(everything) == 4


def test_experts_stage_needs_an_moe_model(capsys) -> None:
    assert cli_main(["profile", "--stages", "experts", "--shares", "0.5"]) == 2
    assert "stage experts needs an MoE model directory" in capsys.readouterr().err
