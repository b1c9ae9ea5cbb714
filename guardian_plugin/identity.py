"""Who sent a request: the client id the ledger counts under, from the request's headers.

Three ways to identify clients (``identity:`` in the guard config), in the order of how much they can
be trusted:

- ``api_key_header: X-Api-Key``: the API key is the ONLY identity. Other identity headers are ignored,
  so no header value lets one client reach another's record. The key itself is never stored: the
  client id is ``key:`` + a salted SHA-256 of it, with a secret salt (``salt:`` or the environment
  variable GUARDIAN_ID_SALT, at least 16 characters) that must be set; a Guardian will not start
  without one. Hashed ids never appear in responses.
- ``headers: [X-Client-Id]`` with ``trusted_proxy``: the id is taken from the header only on requests
  that carry the gateway's shared secret (``trusted_proxy: {secret_header: X-Gateway-Secret}``, secret
  from the environment variable named by ``secret_env``); any other request is answered 401. Use this
  when an authenticating gateway sets the id header.
- ``headers: [X-Client-Id]`` alone: the client chooses its own id. Anyone can then act in another
  client's name (and get it refused); trust this only behind a gateway that overwrites the header.

Ids are at most ``max_length`` characters of printable ASCII; the ``key:`` prefix is reserved for
hashed API keys. A request with no identity is answered 401 (``missing: reject``, the default), or
served as anonymous (``missing: anonymous``): anonymous requests are never refused -- one anonymous
attacker cannot lock out other anonymous users -- and every anonymous answer gets Deceptive
Predictions (same ranking, same top-1, no probability information), so the anonymous door gives an
attacker labels only, never the soft labels that data-free attacks distil. They are not written to the
ledger (there is no client to count).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Mapping, Optional

from guardian_plugin.config import IdentityConfig
from guardian_plugin.errors import ConfigError, GuardianError

SALT_ENV = "GUARDIAN_ID_SALT"
MIN_SALT_LENGTH = 16
KEY_PREFIX = "key:"
MAX_KEY_LENGTH = 4096  # API keys longer than this are not hashed (a bad request, not an identity)


class IdentityError(GuardianError):
    """A request without a usable identity; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind = status, kind


def header(headers: Mapping | None, name: str) -> Optional[str]:
    """A header's value, looked up case-insensitively (bytes keys and values accepted); None when absent
    or blank."""
    lname = name.lower()
    for k, v in (headers or {}).items():
        key = k.decode("latin-1") if isinstance(k, (bytes, bytearray)) else str(k)
        if key.lower() == lname:
            if isinstance(v, (bytes, bytearray)):
                v = v.decode("utf-8", "replace")
            v = str(v).strip()
            return v or None
    return None


def hash_key(value: str, salt: str) -> str:
    return KEY_PREFIX + hashlib.sha256((salt + "\x00" + value).encode()).hexdigest()[:32]


def _printable(s: str) -> bool:
    return all(" " <= ch <= "~" for ch in s)


class Identity:
    """Resolves request headers to a client id under one IdentityConfig; checks its secrets at start."""

    def __init__(self, cfg: IdentityConfig | None = None, environ: Mapping[str, str] | None = None):
        self.cfg = cfg = cfg or IdentityConfig()
        env = os.environ if environ is None else environ
        self.salt: Optional[str] = None
        self.gateway_secret: Optional[str] = None
        if cfg.api_key_header:
            self.salt = cfg.salt or env.get(SALT_ENV) or ""
            if len(self.salt) < MIN_SALT_LENGTH:
                raise ConfigError(
                    f"identity.api_key_header is {cfg.api_key_header!r}, so API keys are hashed with a secret salt: "
                    f"set identity.salt or the environment variable {SALT_ENV} to a random string of at least "
                    f"{MIN_SALT_LENGTH} characters (e.g. `python -c 'import secrets; print(secrets.token_hex(16))'`)")
        elif cfg.trusted_proxy is not None:
            self.gateway_secret = env.get(cfg.trusted_proxy.secret_env) or ""
            if len(self.gateway_secret) < MIN_SALT_LENGTH:
                raise ConfigError(
                    f"identity.trusted_proxy: set the environment variable {cfg.trusted_proxy.secret_env} to the "
                    f"secret your gateway sends in {cfg.trusted_proxy.secret_header} (at least {MIN_SALT_LENGTH} "
                    "characters)")

    def names(self) -> str:
        return self.cfg.api_key_header or ", ".join(self.cfg.headers)

    def client_id(self, headers: Mapping | None) -> Optional[str]:
        """The ledger key of a request, or None for an anonymous request (``missing: anonymous``).
        Raises IdentityError (401 no or untrusted identity, 400 a malformed one)."""
        cfg = self.cfg
        if cfg.api_key_header:
            key = header(headers, cfg.api_key_header)
            if key is not None:
                if len(key) > MAX_KEY_LENGTH:
                    raise IdentityError(400, "InvalidIdentity", f"the {cfg.api_key_header} header is too long")
                return hash_key(key, self.salt)
            return self._missing()
        if self.gateway_secret is not None:
            sent = header(headers, cfg.trusted_proxy.secret_header) or ""
            if not hmac.compare_digest(sent.encode(), self.gateway_secret.encode()):
                raise IdentityError(401, "UntrustedGateway",
                                    "this service takes client identities only from its gateway")
        for name in cfg.headers:
            v = header(headers, name)
            if v is None:
                continue
            if len(v) > cfg.max_length or not _printable(v):
                raise IdentityError(400, "InvalidIdentity", f"the {name} header must be at most {cfg.max_length} "
                                                            "printable ASCII characters")
            if v.startswith(KEY_PREFIX):
                raise IdentityError(400, "InvalidIdentity", f"the {name} value {v!r} is reserved")
            return v
        return self._missing()

    def _missing(self) -> Optional[str]:
        if self.cfg.missing == "anonymous":
            return None
        raise IdentityError(401, "MissingIdentity", f"no client identity: send the header {self.names()}")
