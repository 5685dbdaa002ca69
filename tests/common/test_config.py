"""Service configuration from the environment (services/common/config.py) and its validation."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.common.config import WorkerConfig, from_env
from services.decode.config import DecodeConfig
from services.gateway.config import GatewayConfig
from services.prefill.config import PrefillConfig


@dataclass(frozen=True)
class Sample:
    """A config with one field of every kind from_env coerces."""

    count: int = 1
    ratio: float = 0.5
    enabled: bool = False
    name: str = "default"
    store_url: str = ""


def test_defaults_without_environment():
    cfg = from_env(Sample, env={})
    assert cfg == Sample()
    decode = from_env(DecodeConfig, env={})
    assert decode.kv_slots == 64 and decode.kv_transport == "auto"


def test_env_overrides_each_kind():
    env = {
        "ELASTUNE_COUNT": "42",
        "ELASTUNE_RATIO": "0.125",
        "ELASTUNE_ENABLED": "true",
        "ELASTUNE_NAME": "from-env",
        "UNRELATED": "x",
    }
    cfg = from_env(Sample, env=env)
    assert cfg == Sample(count=42, ratio=0.125, enabled=True, name="from-env")
    assert type(cfg.count) is int and type(cfg.ratio) is float and type(cfg.enabled) is bool


@pytest.mark.parametrize("raw,value", [
    ("1", True), ("yes", True), ("TRUE", True), ("True", True),
    ("0", False), ("no", False), ("false", False), ("FALSE", False),
])
def test_bool_spellings(raw, value):
    assert from_env(Sample, env={"ELASTUNE_ENABLED": raw}).enabled is value


def test_real_service_configs_read_env():
    env = {"ELASTUNE_MAX_BATCH_SIZE": "5", "ELASTUNE_HEARTBEAT_TTL_S": "7.5", "ELASTUNE_KV_TRANSPORT": "grpc"}
    decode = from_env(DecodeConfig, env=env)
    assert (decode.max_batch_size, decode.heartbeat_ttl_s, decode.kv_transport) == (5, 7.5, "grpc")
    prefill = from_env(PrefillConfig, env=env)
    assert prefill.max_batch_size == 5
    gateway = from_env(GatewayConfig, env={"ELASTUNE_HTTP_PORT": "0", "ELASTUNE_REFRESH_S": "0.5"})
    assert (gateway.http_port, gateway.refresh_s) == (0, 0.5)


def test_redis_url_is_an_alias_for_store_url():
    url = "redis://store.example:6379/2"
    assert from_env(Sample, env={"REDIS_URL": url}).store_url == url
    assert from_env(DecodeConfig, env={"REDIS_URL": url}).store_url == url
    assert from_env(GatewayConfig, env={"REDIS_URL": url}).store_url == url
    # the prefixed name is more specific than the alias
    both = {"REDIS_URL": url, "ELASTUNE_STORE_URL": "redis://other:1"}
    assert from_env(Sample, env=both).store_url == "redis://other:1"


def test_explicit_overrides_win_over_env():
    env = {"ELASTUNE_COUNT": "42", "ELASTUNE_NAME": "from-env", "REDIS_URL": "redis://env:1"}
    cfg = from_env(Sample, env=env, count=7, store_url="redis://flag:2", name=None)
    assert cfg.count == 7
    assert cfg.store_url == "redis://flag:2"
    assert cfg.name == "from-env"  # None: the flag was not given


def test_empty_env_value_is_ignored():
    assert from_env(Sample, env={"ELASTUNE_COUNT": ""}).count == 1


@pytest.mark.parametrize("var,raw", [
    ("ELASTUNE_COUNT", "many"), ("ELASTUNE_COUNT", "1.5"), ("ELASTUNE_RATIO", "half"), ("ELASTUNE_ENABLED", "maybe"),
])
def test_bad_value_names_the_variable(var, raw):
    with pytest.raises(ValueError) as info:
        from_env(Sample, env={var: raw})
    assert var in str(info.value)
    assert raw in str(info.value)


def test_bad_int_in_service_config_names_the_variable():
    with pytest.raises(ValueError, match="ELASTUNE_KV_SLOTS"):
        from_env(DecodeConfig, env={"ELASTUNE_KV_SLOTS": "lots"})


def test_from_env_validates():
    with pytest.raises(ValueError, match="max_concurrency"):
        from_env(DecodeConfig, env={"ELASTUNE_KV_SLOTS": "8", "ELASTUNE_MAX_CONCURRENCY": "9"})


def test_decode_rejects_concurrency_above_slots():
    DecodeConfig(kv_slots=8, max_concurrency=8).validate()
    with pytest.raises(ValueError) as info:
        DecodeConfig(kv_slots=8, max_concurrency=9).validate()
    assert "9" in str(info.value) and "8" in str(info.value)


@pytest.mark.parametrize("transport", ["shm", "", "GRPC", "raw"])
def test_decode_rejects_bad_kv_transport(transport):
    with pytest.raises(ValueError, match="kv_transport"):
        DecodeConfig(kv_transport=transport).validate()


@pytest.mark.parametrize("transport", ["auto", "tcp", "grpc"])
def test_decode_accepts_known_kv_transport(transport):
    DecodeConfig(kv_transport=transport).validate()


@pytest.mark.parametrize(("transport", "cross_host", "offers"), [
    ("auto", "tcp", True), ("auto", "grpc", False), ("tcp", "grpc", True), ("grpc", "tcp", False),
])
def test_decode_offers_the_tcp_path_when_configured(transport, cross_host, offers):
    cfg = DecodeConfig(kv_transport=transport, kv_cross_host=cross_host)
    cfg.validate()
    assert cfg.offers_tcp is offers


@pytest.mark.parametrize(("field", "value"), [("kv_cross_host", "shm"), ("kv_tcp_port", 70000), ("kv_tcp_timeout_s", 0)])
def test_decode_rejects_bad_tcp_settings(field, value):
    with pytest.raises(ValueError, match=field):
        DecodeConfig(**{field: value}).validate()


@pytest.mark.parametrize("name", ["kv_slots", "max_concurrency", "max_batch_size", "max_waiting"])
def test_decode_rejects_zero_sizes(name):
    values = {"kv_slots": 4, "max_concurrency": 4, name: 0}
    with pytest.raises(ValueError, match=name):
        DecodeConfig(**values).validate()


@pytest.mark.parametrize("name", ["max_batch_size", "max_batch_tokens", "max_queue"])
def test_prefill_rejects_zero(name):
    PrefillConfig().validate()
    with pytest.raises(ValueError, match=name):
        PrefillConfig(**{name: 0}).validate()


def test_worker_validation():
    with pytest.raises(ValueError, match="heartbeat_ttl_s"):
        WorkerConfig(report_interval_s=2.0, heartbeat_ttl_s=2.0).validate()
    with pytest.raises(ValueError, match="port"):
        WorkerConfig(port=70000).validate()
    with pytest.raises(ValueError, match="gpu_share"):
        PrefillConfig(gpu_share=0.0).validate()  # subclasses keep the shared checks
