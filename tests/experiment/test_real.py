"""Real mode: one short run on `elastune up --autoscale` with the load client, into RunData."""

from __future__ import annotations

import pytest

from services.experiment.config import parse
from services.experiment.metrics import Slo, summarize
from services.experiment.real import run_real
from services.experiment.workload import build

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("api", ["http", "grpc"])
def test_a_short_real_run_records_every_request_and_the_replicas(tmp_path, tiny_model, api):
    cfg = parse({"name": "real", "mode": "real", "runs": ["elastic"], "seed": 0,
                 "workload": {"kind": "poisson", "rate": 2.0, "duration_s": 6, "prompt_median": 16,
                              "output_median": 16, "max_context": 256, "max_output": 32},
                 "real": {"model": str(tiny_model), "sample_s": 0.5, "api": api}})
    requests = build(cfg.workload, cfg.seed)
    data = run_real(cfg, "elastic", requests, tmp_path / "run", echo=lambda line: None)
    assert len(data) == len(requests) > 0
    assert data.status == ["ok"] * len(requests)
    assert all(t is not None and 0 < t <= e for t, e in zip(data.ttft_s, data.e2e_s))
    assert sum(data.itl_weights) == sum(r.output_tokens - 1 for r in requests)  # every gap, none twice
    for stage in ("prefill", "decode"):
        assert max(s.ready for s in data.timeline if s.stage == stage) >= 1
    assert data.share_seconds >= data.duration_s  # a worker per stage, most of the time
    summary = summarize(data, Slo(5.0, 1.0))
    assert summary["completed"] == len(requests)
