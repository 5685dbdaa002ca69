"""Token buckets, API keys and request timeouts: the pure pieces of the gateway's door."""

from __future__ import annotations

import pytest

from services.gateway.auth import ANONYMOUS, Authenticator, Unauthorized, bearer, key_id, load_keys
from services.gateway.budget import TokenBudgets
from services.gateway.config import GatewayConfig
from services.gateway.gate import Rejected, parse_timeout


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_bucket_starts_full_and_refills_at_the_rate():
    clock = Clock()
    b = TokenBudgets(tokens_per_s=100, burst_tokens=1_000, clock=clock)
    assert b.charge("k", 600).ok
    denied = b.charge("k", 600)
    assert not denied.ok and denied.retry_after_s == pytest.approx(2.0)  # 200 short at 100 tokens/s
    clock.now += 2.0
    assert b.charge("k", 600).ok
    assert b.level("k") == pytest.approx(0.0)
    clock.now += 1_000
    assert b.level("k") == 1_000  # never above the burst


def test_keys_have_separate_buckets():
    b = TokenBudgets(10, 100, clock=Clock())
    assert b.charge("a", 100).ok
    assert not b.charge("a", 1).ok
    assert b.charge("b", 100).ok


def test_refund_gives_back_unused_tokens_up_to_the_burst():
    b = TokenBudgets(10, 100, clock=Clock())
    assert b.charge("k", 80).ok
    b.refund("k", 50)
    assert b.level("k") == pytest.approx(70)
    b.refund("k", 500)
    assert b.level("k") == 100


def test_request_over_the_burst_can_never_fit():
    with pytest.raises(ValueError):
        TokenBudgets(10, 100, clock=Clock()).charge("k", 101)


def test_forgotten_keys_are_bounded():
    b = TokenBudgets(1, 10, clock=Clock(), max_keys=2)
    for k in "abc":
        b.charge(k, 10)
    assert len(b._buckets) == 2 and "a" not in b._buckets


def test_keys_from_config_and_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# team keys\nsk-file-1\n\nsk-file-2  # rotated monthly\nsk-inline\n")
    assert load_keys(" sk-inline , ,sk-two", str(f)) == ("sk-inline", "sk-two", "sk-file-1", "sk-file-2")


def test_authenticator():
    auth = Authenticator(("sk-right",))
    assert auth.identify("Bearer sk-right") == key_id("sk-right") != "sk-right"
    assert auth.identify("bearer   sk-right ") == key_id("sk-right")
    for header in (None, "", "Bearer", "Basic sk-right", "Bearer sk-wrong", "sk-right"):
        with pytest.raises(Unauthorized):
            auth.identify(header)
    off = Authenticator(())
    assert not off.enabled
    assert off.identify(None) == ANONYMOUS
    assert off.identify("Bearer anything") == key_id("anything")  # budgets still tell callers apart
    assert bearer("Token x") is None


def test_timeout_from_field_header_or_default():
    cfg = GatewayConfig(default_timeout_s=30, max_timeout_s=120)
    assert parse_timeout({}, {}, cfg) == 30
    assert parse_timeout({"timeout": 2.5}, {}, cfg) == 2.5
    assert parse_timeout({}, {"X-Request-Timeout": "7"}, cfg) == 7
    assert parse_timeout({"timeout": 3}, {"X-Request-Timeout": "7"}, cfg) == 3  # the body wins
    for bad in (0, -1, 121, "soon", True, float("nan"), [1]):
        with pytest.raises(Rejected) as err:
            parse_timeout({"timeout": bad}, {}, cfg)
        assert err.value.kind == "invalid" and err.value.param == "timeout" and "120" in str(err.value)
    with pytest.raises(Rejected) as err:
        parse_timeout({}, {"X-Request-Timeout": "inf"}, cfg)
    assert err.value.param == "X-Request-Timeout"
