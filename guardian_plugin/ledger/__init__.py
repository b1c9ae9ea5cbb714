"""Per-client ledgers, chosen by URI scheme the way the `limits` library picks storage backends.

- ``memory://``                      one process only
- ``sqlite:///abs/path/ledger.db``   (default) one file shared by all workers on a host;
  ``sqlite://relative/path.db`` is relative to the working directory
- ``redis://host:6379/0``            shared by all hosts (see guardian_plugin.ledger.redis);
  ``rediss://`` for TLS

SQLite and Redis forget clients idle for ``?retention=`` (default 30d; ``0`` keeps them forever);
refused and blocked clients are kept. Each backend class names its schemes (``schemes``) and is
registered in ``LEDGERS`` by :func:`register_ledger`; adding one is one module and one import below.
"""

from __future__ import annotations

from urllib.parse import urlparse

from guardian_plugin.errors import ConfigError
from guardian_plugin.ledger.base import (DEFAULT_RETENTION_S, LEDGERS, MAX_CLIENT_ID_LENGTH, ClientState, Ledger,
                                         RefusalRule, default_tau, false_refusal_probability, register_ledger)
from guardian_plugin.ledger.memory import MemoryLedger
from guardian_plugin.ledger.redis import RedisLedger  # imports redis-py only when one is made
from guardian_plugin.ledger.sqlite import SQLiteLedger, sqlite_path


def open_ledger(uri: str, rule: RefusalRule | None = None, namespace: str = "default", **kw) -> Ledger:
    """Open the ledger a URI names. A bare path (no scheme) is taken as a SQLite file. ``must_exist=True``
    (operator tools): fail with ConfigError instead of creating a SQLite file; other keywords go to the
    backend's constructor."""
    if "://" not in uri:
        uri = "sqlite:///" + uri.lstrip("/") if uri.startswith("/") else "sqlite://" + uri
    scheme = urlparse(uri).scheme
    if scheme not in LEDGERS:
        raise ConfigError(f"ledger {uri!r}: unknown scheme {scheme!r}; known: {', '.join(LEDGERS.names())}")
    return LEDGERS.get(scheme).from_uri(uri, rule or RefusalRule(), namespace, **kw)


__all__ = ["ClientState", "Ledger", "RefusalRule", "open_ledger", "default_tau", "false_refusal_probability",
           "register_ledger", "LEDGERS", "MAX_CLIENT_ID_LENGTH", "DEFAULT_RETENTION_S", "MemoryLedger",
           "SQLiteLedger", "RedisLedger", "sqlite_path"]
