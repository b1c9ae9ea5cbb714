"""Client identity from request headers, shared by the serving adapters.

Headers are matched case-insensitively. An API key header's value is never stored: the client id is a
salted SHA-256 of it (salt from the config or the GUARDIAN_ID_SALT environment variable). A request
with no identity goes to a shared anonymous bucket, or is rejected (HTTP 401) when configured so.
"""

from __future__ import annotations

import hashlib
import os
from typing import Mapping, Optional

from guardian_plugin.config import IdentityConfig


class MissingIdentity(Exception):
    """No identity header and ``missing: reject``: answer HTTP 401."""


def _lookup(headers: Mapping, name: str) -> Optional[str]:
    lname = name.lower()
    for k, v in headers.items():
        key = k.decode() if isinstance(k, (bytes, bytearray)) else str(k)
        if key.lower() == lname:
            if isinstance(v, (bytes, bytearray)):
                v = v.decode("utf-8", "replace")
            v = str(v).strip()
            return v or None
    return None


def hash_key(value: str, salt: str) -> str:
    return "key:" + hashlib.sha256((salt + "\x00" + value).encode()).hexdigest()[:32]


def client_id(headers: Mapping | None, cfg: IdentityConfig) -> str:
    """The ledger key for a request's headers (raises MissingIdentity when configured to reject)."""
    headers = headers or {}
    if cfg.api_key_header:
        key = _lookup(headers, cfg.api_key_header)
        if key is not None:
            return hash_key(key, cfg.salt or os.environ.get("GUARDIAN_ID_SALT", ""))
    for h in cfg.headers:
        v = _lookup(headers, h)
        if v is not None:
            return v
    if cfg.missing == "reject":
        names = ", ".join(([cfg.api_key_header] if cfg.api_key_header else []) + list(cfg.headers))
        raise MissingIdentity(f"no client identity: send one of the headers {names}")
    return cfg.anonymous_id
