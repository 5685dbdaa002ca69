"""Every service exports its metrics under stable names, and the Grafana dashboard only asks
for metrics that some service exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest

from services.experts.metrics import ExpertsMetrics
from services.gateway.metrics import GatewayMetrics
from services.launcher import free_port
from services.scaler.metrics import ScalerMetrics
from services.tuner.metrics import TunerMetrics
from tests.stack import start_stack

DASHBOARD = Path(__file__).parents[2] / "k8s" / "observability" / "grafana-dashboard.json"

# The contract with dashboards and alerts: renaming one of these breaks them.
WORKER = {"elastune_worker_queue_length", "elastune_worker_queued_tokens", "elastune_worker_active_sequences",
          "elastune_worker_kv_used_bytes", "elastune_worker_kv_capacity_bytes", "elastune_worker_runtime_setting",
          "elastune_worker_step_p95_seconds"}
DECODE = WORKER | {"elastune_decode_output_tokens_total", "elastune_decode_prompt_tokens_total",
                   "elastune_decode_preemptions_total", "elastune_decode_kv_evictions_total",
                   "elastune_decode_batch_fill_ratio", "elastune_decode_queue_wait_seconds_bucket"}
PREFILL = WORKER | {"elastune_prefill_prompt_tokens_total", "elastune_prefill_queue_wait_seconds_bucket",
                    "elastune_prefill_compute_seconds_bucket"}
GATEWAY = {"elastune_gateway_prompt_tokens_total", "elastune_gateway_completion_tokens_total",
           "elastune_gateway_ttft_seconds_bucket", "elastune_gateway_itl_seconds_bucket",
           "elastune_gateway_e2e_seconds_bucket", "elastune_gateway_stage_requests",
           "elastune_gateway_queued_prompt_tokens", "elastune_gateway_requests_total"}


def samples(text: str) -> dict[str, float]:
    """{name{labels}: value} of an exposition text, and {name: sum} per bare name."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            name = key.split("{", 1)[0]
            if name != key:
                out[name] = out.get(name, 0.0) + float(value)
            out[key] = float(value)
    return out


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every series name a registry can export, whether or not a labelled child exists yet."""
    names = set()
    for family in registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(family.type, ("",))
        names.update(family.name + s for s in suffixes)
    return names


async def test_each_service_exports_its_metrics(store_url, tiny_model):
    port = free_port()
    stack = await start_stack(store_url, tiny_model, decode_overrides={"metrics_port": port})
    try:
        async with aiohttp.ClientSession() as http:
            body = {"model": "tiny", "prompt": "measure me", "max_tokens": 6, "ignore_eos": True, "stream": True}
            async with http.post(stack.base_url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                await resp.read()
            async with http.get(stack.base_url + "/metrics") as resp:
                gateway = samples(await resp.text())
        async with aiohttp.ClientSession() as http:  # the worker's own metrics server (a thread)
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                decode_text = await resp.text()
        decode = samples(decode_text)
        prefill = samples(generate_latest(stack.prefill[0].metrics.registry).decode())
        for service in (stack.gateway, stack.decode[0], stack.prefill[0]):  # the standard gRPC health service
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as ch:
                answer = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await stack.stop()
    assert GATEWAY <= gateway.keys(), GATEWAY - gateway.keys()
    assert DECODE <= decode.keys(), DECODE - decode.keys()
    assert PREFILL <= prefill.keys(), PREFILL - prefill.keys()
    assert gateway["elastune_gateway_completion_tokens_total"] == 6
    assert gateway["elastune_gateway_itl_seconds_count"] >= 1  # tokens after the first are timed
    assert decode["elastune_decode_output_tokens_total"] >= 5  # the first token comes from prefill
    prompt = decode["elastune_decode_prompt_tokens_total"]
    assert prompt > 0 and prefill["elastune_prefill_prompt_tokens_total"] == prompt
    assert decode['elastune_worker_kv_capacity_bytes{stage="decode"}'] > 0
    assert decode['elastune_worker_runtime_setting{setting="max_concurrency",stage="decode"}'] == 32
    assert prefill["elastune_prefill_queue_wait_seconds_count"] == 1


def test_scaler_tuner_and_experts_metrics_are_defined():
    tuner = TunerMetrics()
    tuner.applied("decode", "load", {"max_batch_size": 16})
    experts = ExpertsMetrics()
    experts.routed("g0", {0: 5, 3: 2, 7: 0})
    tuner_s = samples(generate_latest(tuner.registry).decode())
    experts_s = samples(generate_latest(experts.registry).decode())
    assert tuner_s['elastune_tuner_config_changes_total{reason="load",stage="decode"}'] == 1
    assert tuner_s['elastune_tuner_setting{setting="max_batch_size",stage="decode"}'] == 16
    assert experts_s['elastune_experts_tokens_total{expert="0",group="g0"}'] == 5
    assert 'elastune_experts_tokens_total{expert="7",group="g0"}' not in experts_s
    assert "elastune_scaler_decision_reason" in exported_names(ScalerMetrics().registry)


def test_dashboard_queries_only_exported_metrics(store_url, tiny_model):
    from services.common.load_report import LoadReport
    from services.decode.config import DecodeConfig
    from services.decode.server import DecodeWorker
    from services.prefill.config import PrefillConfig
    from services.prefill.server import PrefillWorker

    # Workers' registries read their state at scrape time; unstarted workers report zeros.
    decode = DecodeWorker(DecodeConfig(model_dir=str(tiny_model)))
    decode.load_report = lambda: LoadReport("d", "decode", "a", "h", "m", 0.0)
    prefill = PrefillWorker(PrefillConfig(model_dir=str(tiny_model)))
    registries = [GatewayMetrics().registry, ScalerMetrics().registry, TunerMetrics().registry,
                  ExpertsMetrics().registry, decode.metrics.registry, prefill.metrics.registry]
    exported = set().union(*(exported_names(r) for r in registries))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 20
    queried = {m for e in exprs for m in re.findall(r"\belastune_[a-z0-9_]+", e)}
    assert queried - exported == set()
    # and the headline series of the issue each have a panel
    for name in ("elastune_gateway_ttft_seconds_bucket", "elastune_gateway_itl_seconds_bucket",
                 "elastune_worker_kv_used_bytes", "elastune_scaler_desired_replicas",
                 "elastune_tuner_config_changes_total", "elastune_experts_tokens_total",
                 "elastune_decode_preemptions_total", "elastune_decode_batch_fill_ratio"):
        assert name in queried
