"""Who sent a request: the client id the ledger counts under, from the request's headers.

Three ways to identify clients (``identity:`` in the guard config), in the order of how much they can
be trusted:

- ``api_key_header: X-Api-Key`` (recommended in production): issued API keys, the ONLY identity.
  The operator issues each key with ``guardian keys issue --owner NAME`` and revokes it with
  ``guardian keys revoke CLIENT_ID`` (guardian_plugin.keys). A key carries its client id and an HMAC of
  it under the service's key secret (``key_secret:`` or the environment variable GUARDIAN_KEY_SECRET, at
  least 16 characters; a Guardian will not start without one), checked here in constant time with no
  store lookup; the ledger counts it under ``key:<client id>``. A missing key is 401 MissingIdentity; a
  string that is not a key of this service (wrong format, too long, an HMAC that does not verify: a
  minted or forged key) is 401 InvalidApiKey, and a revoked one 401 RevokedApiKey, before any work.
  Revocations are read from the ledger's store every ``key_refresh_s`` seconds (default 5): that is how
  long a revoked key may still be served. Other identity headers are ignored, so no header value lets
  one client reach another's record.
- ``headers: [X-Client-Id]`` with ``trusted_proxy``: the id is taken from the header only on requests
  that carry the gateway's shared secret (``trusted_proxy: {secret_header: X-Gateway-Secret}``, secret
  from the environment variable named by ``secret_env``); any other request is answered 401. Use this
  when an authenticating gateway sets the id header.
- ``headers: [X-Client-Id]`` alone: the client chooses its own id. Anyone can then act in another
  client's name (and get it refused); trust this only behind a gateway that overwrites the header.

Ids are at most ``max_length`` characters of printable ASCII; the ``key:`` prefix is reserved for
API keys' client ids. A request with no identity is answered 401 (``missing: reject``, the default), or
served as anonymous (``missing: anonymous``): anonymous requests are never refused -- one anonymous
attacker cannot lock out other anonymous users -- and every anonymous answer gets Deceptive
Predictions (same ranking, same top-1, no probability information), so the anonymous door gives an
attacker labels only, never the soft labels that data-free attacks distil. They are not written to the
ledger (there is no client to count).
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from typing import FrozenSet, Mapping, Optional

from guardian_plugin import keys
from guardian_plugin.config import IdentityConfig
from guardian_plugin.errors import ConfigError, GuardianError

log = logging.getLogger("guardian_plugin")

MIN_SECRET_LENGTH = keys.MIN_SECRET_LENGTH
KEY_PREFIX = "key:"


class IdentityError(GuardianError):
    """A request without a usable identity; ``status`` is the HTTP status to answer with
    (``retry_after``: seconds, for a 503)."""

    def __init__(self, status: int, kind: str, message: str, retry_after: Optional[int] = None):
        super().__init__(message)
        self.status, self.kind, self.retry_after = status, kind, retry_after


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


def _printable(s: str) -> bool:
    return all(" " <= ch <= "~" for ch in s)


class Identity:
    """Resolves request headers to a client id under one IdentityConfig; checks its secrets at start."""

    def __init__(self, cfg: IdentityConfig | None = None, environ: Mapping[str, str] | None = None):
        self.cfg = cfg = cfg or IdentityConfig()
        env = os.environ if environ is None else environ
        self.gateway_secret: Optional[str] = None
        self.key_secrets: list = []
        if cfg.api_key_header:
            self.key_secrets = keys.key_secrets(cfg.key_secret, cfg.key_secret_previous, env)
        elif cfg.trusted_proxy is not None:
            self.gateway_secret = env.get(cfg.trusted_proxy.secret_env) or ""
            if len(self.gateway_secret) < MIN_SECRET_LENGTH:
                raise ConfigError(
                    f"identity.trusted_proxy: set the environment variable {cfg.trusted_proxy.secret_env} to the "
                    f"secret your gateway sends in {cfg.trusted_proxy.secret_header} (at least {MIN_SECRET_LENGTH} "
                    "characters)")
        # issued keys: the revoked key ids, read from the key store every cfg.key_refresh_s seconds
        self.key_store: Optional[keys.KeyStore] = None
        self.fail_open = False
        self._revoked: Optional[FrozenSet[str]] = None  # None: never read yet
        self._next_refresh = 0.0
        self._refresh_lock = threading.Lock()
        self._store_down = False

    def use_key_store(self, store: "keys.KeyStore", failure: str = "closed") -> None:
        """Where revocations are read from (the ledger's store). ``failure``: the ledger_failure mode,
        used only while the revoked set could never be read (closed: 503, open: HMAC check only)."""
        self.key_store, self.fail_open = store, failure == "open"
        self._revoked, self._next_refresh = None, 0.0
        self._refresh()

    def _refresh(self) -> None:
        """Read the revoked key ids again; on a store failure keep the last set read (and log)."""
        try:
            revoked = frozenset(self.key_store.revoked_ids())
        except Exception as e:  # any failure to read: the store is down for this purpose
            if not self._store_down:
                log.warning("guardian: cannot read revoked API keys from %s (%s: %s); %s, retrying every %s s",
                            self.key_store.where, type(e).__name__, e,
                            "keeping the last set read" if self._revoked is not None else "none read yet",
                            self.cfg.key_refresh_s)
            self._store_down = True
        else:
            if self._store_down:
                log.warning("guardian: revoked API keys read again from %s", self.key_store.where)
            self._store_down = False
            self._revoked = revoked
        self._next_refresh = time.monotonic() + self.cfg.key_refresh_s

    def revoked(self) -> Optional[FrozenSet[str]]:
        """The revoked key ids as last read, read again first when older than key_refresh_s (by one
        thread; the others use the set at hand)."""
        if time.monotonic() >= self._next_refresh:
            if self._refresh_lock.acquire(blocking=self._revoked is None):
                try:
                    if time.monotonic() >= self._next_refresh:
                        self._refresh()
                finally:
                    self._refresh_lock.release()
        return self._revoked

    def names(self) -> str:
        return self.cfg.api_key_header or ", ".join(self.cfg.headers)

    def client_id(self, headers: Mapping | None) -> Optional[str]:
        """The ledger key of a request, or None for an anonymous request (``missing: anonymous``).
        Raises IdentityError (401 no or untrusted identity, 400 a malformed one)."""
        cfg = self.cfg
        if cfg.api_key_header:
            key = header(headers, cfg.api_key_header)
            if key is not None:
                return KEY_PREFIX + self.key_client(key)
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

    def key_client(self, key: str) -> str:
        """The client id of an issued, unrevoked API key; IdentityError 401 for anything else."""
        parts = keys.parse_key(key)
        if parts is not None:
            client, key_id, sent = parts
            ok = False
            for secret in self.key_secrets:  # every secret is tried: the time does not say which matched
                ok |= hmac.compare_digest(keys.mac(secret, client, key_id), sent)
            if ok:
                if self.key_store is None:
                    raise ConfigError("API keys: no key store to read revocations from (Identity.use_key_store; "
                                      "a Guardian sets it from its ledger)")
                revoked = self.revoked()
                if revoked is None and not self.fail_open:
                    raise IdentityError(503, "LedgerUnavailable", "the per-client store is unavailable; try again "
                                                                  "later", retry_after=5)
                if revoked is not None and key_id in revoked:
                    raise IdentityError(401, "RevokedApiKey", f"this {self.cfg.api_key_header} was revoked; ask "
                                                              "the operator for a new key")
                return client
        raise IdentityError(401, "InvalidApiKey", f"the {self.cfg.api_key_header} header is not an API key issued "
                                                  "by this service; ask the operator for one")

    def _missing(self) -> Optional[str]:
        if self.cfg.missing == "anonymous":
            return None
        raise IdentityError(401, "MissingIdentity", f"no client identity: send the header {self.names()}")
