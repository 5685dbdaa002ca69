"""The KEDA external scaler killed under `elastune up --autoscale`: the workers keep serving, and once
GetMetrics/IsActive have failed more than `fallback.failureThreshold` times in a row the local autoscaler
applies the ScaledObjects' documented fallback (k8s/local: 2 replicas, currentReplicasIfHigher), as KEDA
does on a cluster."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from services.launcher import REPO
from tests.fault.harness import (
    Prober, children, client, health, prompt, start_up, stop_up, stream_tokens, wait_for,
)

pytestmark = pytest.mark.slow


def fallbacks() -> dict[str, dict]:
    docs = {}
    for path in sorted((REPO / "k8s" / "local").glob("scaledobject-*.yaml")):
        doc = yaml.safe_load(path.read_text())
        docs[doc["spec"]["triggers"][0]["metadata"]["stage"]] = doc["spec"]
    return docs


def test_scaler_killed_workers_keep_serving_and_fallback_applies(tmp_path, tiny_model):
    specs = fallbacks()
    assert {"prefill", "decode"} <= set(specs)
    events_path = tmp_path / "events.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    up = start_up(tmp_path, ["--autoscale", "--model", str(tiny_model), "--events", str(events_path)], env)
    try:
        c = client(up.base)
        texts = [prompt(400 + i, i) for i in range(4)]
        with ThreadPoolExecutor(len(texts)) as pool:
            expected = list(pool.map(lambda t: stream_tokens(c, t, 120), texts))
            (scaler,) = children(up.proc.pid, "scaler")
            with Prober(up.base) as prober:
                killed_at = time.time()  # the autoscaler stamps its events with time.time() too
                os.kill(scaler, signal.SIGKILL)
                running = [pool.submit(stream_tokens, c, t, 120) for t in texts]
                got = [f.result(timeout=90) for f in running]

                def fell_back() -> dict[str, dict]:
                    lines = events_path.read_text().splitlines() if events_path.exists() else []
                    return {e["stage"]: e for e in map(json.loads, lines) if e["reason"] == "fallback"}

                # failureThreshold failures in a row, one per pollingInterval, then the fallback poll
                limit = max((s["fallback"]["failureThreshold"] + 2) * s["pollingInterval"] for s in specs.values()) + 10
                wait_for(lambda: set(fell_back()) >= {"prefill", "decode"}, limit, "the fallback for both stages")
                for stage, event in fell_back().items():
                    fallback = specs[stage]["fallback"]
                    assert fallback["behavior"] == "currentReplicasIfHigher"
                    assert (event["from"], event["to"]) == (1, max(1, fallback["replicas"])), event
                    # not before the threshold: failures must exceed it, one per poll, the first at once
                    assert event["time"] - killed_at >= fallback["failureThreshold"] * specs[stage]["pollingInterval"] - 0.5
                # the fallback replicas start, register and serve while the scaler is still down
                wait_for(lambda: health(up.base) == {"prefill": 2, "decode": 2}, 90, "the fallback replicas serving")
            assert got == expected
            assert prober.failures == [] and prober.done >= 5
        assert children(up.proc.pid, "scaler") == []  # nothing restarted it: all of the above ran without it
    finally:
        stop_up(up)
