"""Issued API keys: the operator issues and revokes them; a request's key is checked without a store
lookup (guardian_plugin.identity, ``identity.api_key_header``).

A key is ``gk_<client id>_<key id>_<mac>``:

- ``client id``: what the ledger counts the key's requests under (as ``key:<client id>``), 1-64 of
  ``A-Z a-z 0-9 . _ -``;
- ``key id``: 16 random hex digits, one per issued key, so a client id can get a new key after its old
  one was revoked (the old one stays revoked);
- ``mac``: HMAC-SHA256 of ``<client id>_<key id>`` under the service's key secret (``identity.key_secret``
  or the environment variable GUARDIAN_KEY_SECRET, at least 16 characters), the first 32 hex digits
  (128 bits). Only someone holding the secret can make a key that passes; it is checked in constant
  time, in the process, with no store read.

Revocation is the one thing the process must learn from the store: the key registry (below) keeps
every issued key's record (key id, client id, owner, issued and revoked times; never the key) in the
ledger's store, under the ledger's namespace, and each process keeps the set of revoked key ids in
memory, read again every ``identity.key_refresh_s`` seconds (default 5): a revoked key is refused
within that delay. Should the store be down at a refresh, the last set read is kept (and logged) and the
read is tried again after the same delay.

Stores, chosen by the ledger URI:

- ``sqlite:///path.db``: a table ``api_keys`` in the ledger's file;
- ``redis://host:6379/0``: ``<prefix>:{<namespace>}:keys`` (key id -> JSON record) and
  ``<prefix>:{<namespace>}:revoked`` (key id -> revoked time), beside the ledger's client hashes;
- ``memory://``: one dict per namespace in this process (tests).

The CLI is ``guardian keys issue|list|revoke`` (guardian_plugin.keys_cli).
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Set
from urllib.parse import quote

from guardian_plugin.errors import ConfigError

KEY_SECRET_ENV = "GUARDIAN_KEY_SECRET"
PREVIOUS_SECRET_ENV = "GUARDIAN_KEY_SECRET_PREVIOUS"  # also accepted while keys are re-issued (rotation)
MIN_SECRET_LENGTH = 16
TOKEN = "gk_"
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
KEY_ID_HEX, MAC_HEX = 16, 32
_KEY_RE = re.compile(r"gk_([A-Za-z0-9._-]{1,64})_([0-9a-f]{16})_([0-9a-f]{32})")
MAX_KEY_LENGTH = len(TOKEN) + 64 + 1 + KEY_ID_HEX + 1 + MAC_HEX  # 117: longer headers are not parsed


# ---------------------------------------------------------------------------------- the key format
def mac(secret: str, client_id: str, key_id: str) -> str:
    return hmac.new(secret.encode(), f"{client_id}_{key_id}".encode(), hashlib.sha256).hexdigest()[:MAC_HEX]


def make_key(secret: str, client_id: str, key_id: str) -> str:
    return f"{TOKEN}{client_id}_{key_id}_{mac(secret, client_id, key_id)}"


def parse_key(key: str) -> Optional[tuple]:
    """(client id, key id, mac) of a string in the key format, or None (no HMAC checked here)."""
    if len(key) > MAX_KEY_LENGTH:
        return None
    m = _KEY_RE.fullmatch(key)
    return m.groups() if m else None


def check_new_client_id(client_id: str) -> str:
    if not CLIENT_ID_RE.fullmatch(client_id or ""):
        raise ConfigError(f"client id {client_id!r}: use 1-64 characters of A-Z a-z 0-9 . _ -")
    return client_id


def key_secrets(configured: Optional[str] = None, previous: Optional[str] = None, environ=None,
                setting: str = "identity.key_secret") -> List[str]:
    """The secrets a key may be signed with, the current one first: ``configured`` or GUARDIAN_KEY_SECRET,
    then ``previous`` or GUARDIAN_KEY_SECRET_PREVIOUS when set (rotation). ConfigError when the current
    one is missing or short."""
    env = os.environ if environ is None else environ
    current = configured or env.get(KEY_SECRET_ENV) or ""
    if len(current) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"API keys are issued keys signed with a secret: set {setting} or the environment variable "
            f"{KEY_SECRET_ENV} to a random string of at least {MIN_SECRET_LENGTH} characters (e.g. "
            "`python -c 'import secrets; print(secrets.token_hex(32))'`), the same for every worker and for "
            "`guardian keys issue`")
    out = [current]
    old = previous or env.get(PREVIOUS_SECRET_ENV) or ""
    if old:
        if len(old) < MIN_SECRET_LENGTH:
            raise ConfigError(f"the previous key secret ({PREVIOUS_SECRET_ENV} or identity.key_secret_previous) "
                              f"must be at least {MIN_SECRET_LENGTH} characters")
        if old != current:
            out.append(old)
    return out


# ---------------------------------------------------------------------------------- the registry
@dataclass
class KeyRecord:
    key_id: str
    client_id: str
    owner: str
    issued_at: float
    revoked_at: Optional[float] = None


class KeyStore(abc.ABC):
    """Where issued keys' records live (never the keys). ``where`` names it in messages."""

    where = "key store"

    @abc.abstractmethod
    def add(self, rec: KeyRecord) -> None:
        """Store ``rec``."""

    @abc.abstractmethod
    def records(self) -> List[KeyRecord]:
        """Every stored record."""

    @abc.abstractmethod
    def revoke(self, client_id: str, t: float) -> List[KeyRecord]:
        """Mark every unrevoked key of ``client_id`` revoked at ``t``; the records so marked."""

    @abc.abstractmethod
    def revoked_ids(self) -> Set[str]:
        """The key ids that are revoked (what each process refreshes)."""

    def close(self) -> None:
        if getattr(self, "ledger", None) is not None:
            self.ledger.close()

    def issue(self, secret: str, owner: str, client_id: Optional[str] = None) -> tuple:
        """A new key for ``client_id`` (default: a random ``c-<12 hex>``): (key, record). The key is
        returned once and not kept."""
        client_id = check_new_client_id(client_id) if client_id else "c-" + secrets.token_hex(6)
        if not owner or not owner.strip():
            raise ConfigError("give the key's owner: --owner NAME")
        rec = KeyRecord(secrets.token_hex(KEY_ID_HEX // 2), client_id, owner.strip(), time.time())
        self.add(rec)
        return make_key(secret, client_id, rec.key_id), rec


_MEMORY: Dict[str, Dict[str, KeyRecord]] = {}
_MEMORY_LOCK = threading.Lock()


class MemoryKeyStore(KeyStore):
    """One dict per namespace, shared by every MemoryKeyStore of this process (tests)."""

    def __init__(self, namespace: str = "default"):
        self.where = f"memory key store namespace={namespace}"
        with _MEMORY_LOCK:
            self._recs = _MEMORY.setdefault(namespace, {})

    def add(self, rec):
        with _MEMORY_LOCK:
            self._recs[rec.key_id] = KeyRecord(**asdict(rec))

    def records(self):
        with _MEMORY_LOCK:
            return [KeyRecord(**asdict(r)) for r in self._recs.values()]

    def revoke(self, client_id, t):
        with _MEMORY_LOCK:
            out = [r for r in self._recs.values() if r.client_id == client_id and r.revoked_at is None]
            for r in out:
                r.revoked_at = t
            return [KeyRecord(**asdict(r)) for r in out]

    def revoked_ids(self):
        with _MEMORY_LOCK:
            return {k for k, r in self._recs.items() if r.revoked_at is not None}


_SQL = """CREATE TABLE IF NOT EXISTS api_keys (
    namespace TEXT NOT NULL,
    key_id TEXT NOT NULL,
    client_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    issued_at REAL NOT NULL,
    revoked_at REAL,
    PRIMARY KEY (namespace, key_id)
)"""


class SQLiteKeyStore(KeyStore):
    """Table ``api_keys`` in the ledger's SQLite file (one connection per thread, WAL like the ledger)."""

    def __init__(self, path: str, namespace: str = "default", timeout_s: float = 5.0):
        self.path, self.namespace, self.timeout_s = path, namespace, timeout_s
        self.where = f"sqlite key store {path} namespace={namespace}"
        self._local = threading.local()
        self._tables_made = False

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
            con.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
            self._local.con = con
        if not self._tables_made:
            con.execute(_SQL)
            self._tables_made = True
        return con

    def add(self, rec):
        self._con().execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?)",
                            (self.namespace, rec.key_id, rec.client_id, rec.owner, rec.issued_at, rec.revoked_at))

    def records(self):
        rows = self._con().execute("SELECT key_id, client_id, owner, issued_at, revoked_at FROM api_keys "
                                   "WHERE namespace=? ORDER BY issued_at", (self.namespace,)).fetchall()
        return [KeyRecord(*r) for r in rows]

    def revoke(self, client_id, t):
        con = self._con()
        con.execute("BEGIN IMMEDIATE")
        try:
            rows = con.execute("SELECT key_id, client_id, owner, issued_at FROM api_keys WHERE namespace=? AND "
                               "client_id=? AND revoked_at IS NULL", (self.namespace, client_id)).fetchall()
            con.execute("UPDATE api_keys SET revoked_at=? WHERE namespace=? AND client_id=? AND revoked_at IS NULL",
                        (t, self.namespace, client_id))
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
        return [KeyRecord(*r, revoked_at=t) for r in rows]

    def revoked_ids(self):
        rows = self._con().execute("SELECT key_id FROM api_keys WHERE namespace=? AND revoked_at IS NOT NULL",
                                   (self.namespace,)).fetchall()
        return {r[0] for r in rows}

    def close(self):
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None
        super().close()


class RedisKeyStore(KeyStore):
    """``<prefix>:{<namespace>}:keys`` and ``...:revoked`` hashes, on the ledger's Redis client."""

    def __init__(self, client, prefix: str, namespace: str, safe_url: str = "redis"):
        self.r = client
        base = f"{prefix}:{{{quote(namespace, safe='')}}}:"
        self._keys, self._revoked = base + "keys", base + "revoked"
        self.where = f"redis key store {safe_url} namespace={namespace}"

    def add(self, rec):
        if not self.r.hsetnx(self._keys, rec.key_id, json.dumps(asdict(rec))):
            raise ConfigError(f"{self.where}: key id {rec.key_id} exists already; issue again")

    def records(self):
        recs = [KeyRecord(**json.loads(v)) for v in self.r.hgetall(self._keys).values()]
        return sorted(recs, key=lambda r: r.issued_at)

    def revoke(self, client_id, t):
        out = [r for r in self.records() if r.client_id == client_id and r.revoked_at is None]
        if out:
            for r in out:
                r.revoked_at = t
            p = self.r.pipeline(transaction=True)
            p.hset(self._revoked, mapping={r.key_id: repr(t) for r in out})
            p.hset(self._keys, mapping={r.key_id: json.dumps(asdict(r)) for r in out})
            p.execute()
        return out

    def revoked_ids(self):
        return {k.decode() if isinstance(k, bytes) else k for k in self.r.hkeys(self._revoked)}


def key_store_for(ledger) -> KeyStore:
    """The key registry in the same store and namespace as ``ledger`` (a ResilientLedger is unwrapped)."""
    from guardian_plugin.ledger import MemoryLedger, RedisLedger, SQLiteLedger

    inner = getattr(ledger, "inner", ledger)
    if isinstance(inner, SQLiteLedger):
        return SQLiteKeyStore(inner.path, inner.namespace)
    if isinstance(inner, RedisLedger):
        return RedisKeyStore(inner.r, inner.prefix, inner.namespace, inner.safe_url)
    if isinstance(inner, MemoryLedger):
        return MemoryKeyStore(inner.namespace)
    raise ConfigError(f"API keys: no key registry for a {type(inner).__name__} ledger; use a memory://, sqlite:// "
                      "or redis:// ledger")


def open_key_store(uri: str, namespace: str = "default", must_exist: bool = False) -> KeyStore:
    """The key registry of the ledger a URI names (``must_exist``: fail instead of creating a SQLite file)."""
    from guardian_plugin.ledger import open_ledger

    ledger = open_ledger(uri, None, namespace, must_exist=must_exist)
    store = key_store_for(ledger)
    store.ledger = ledger  # closed with the store
    return store
