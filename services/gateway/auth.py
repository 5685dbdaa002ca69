"""Optional bearer-token auth for the gateway (HTTP `Authorization: Bearer <key>`, gRPC
metadata `authorization`).

Keys come from the config (`api_keys`, comma-separated) and/or a file (`api_keys_file`, one
key per line, `#` comments), so a Kubernetes Secret can be mounted as a file. With no key
configured, auth is off and every caller is accepted. `/health` and `/metrics` never need a
key: kubelet probes and Prometheus scrapes carry none, and neither path reveals request data.

The caller's identity for budgets and logs is a short hash of its key, never the key itself.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

ANONYMOUS = "anonymous"
EXEMPT_PATHS = frozenset({"/health", "/metrics"})


class Unauthorized(Exception):
    pass


def load_keys(inline: str, path: str) -> tuple[str, ...]:
    keys = [k.strip() for k in inline.split(",") if k.strip()]
    if path:
        for line in Path(path).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(line)
    return tuple(dict.fromkeys(keys))


def key_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


class Authenticator:
    def __init__(self, keys: tuple[str, ...]):
        self._keys = tuple(k.encode() for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, authorization: str | None) -> str:
        """The caller's id (for budgets); raises Unauthorized when auth is on and the key is wrong."""
        key = bearer(authorization)
        if not self.enabled:
            return key_id(key) if key else ANONYMOUS
        if key is None:
            raise Unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
        given = key.encode()
        # compare against every key, so the time taken does not say which prefix matched
        if not any([hmac.compare_digest(given, k) for k in self._keys]):
            raise Unauthorized("incorrect API key provided")
        return key_id(key)
