"""Per-client ledgers, chosen by URI scheme the way the `limits` library picks storage backends.

- ``memory://``                      one process only
- ``sqlite:///abs/path/ledger.db``   (default) one file shared by all workers on a host;
  ``sqlite://relative/path.db`` is relative to the working directory
- ``redis://host:6379/0``            shared by all hosts (see guardian_plugin.ledger.redis);
  ``rediss://`` for TLS; ``?retention=30d`` forgets idle clients
"""

from __future__ import annotations

from typing import Callable, Dict
from urllib.parse import urlparse

from guardian_plugin.errors import ConfigError
from guardian_plugin.ledger.base import ClientState, Ledger, RefusalRule, default_tau, false_refusal_probability

LEDGER_SCHEMES: Dict[str, Callable[..., Ledger]] = {}


def register_scheme(scheme: str):
    def deco(factory):
        LEDGER_SCHEMES[scheme] = factory
        return factory

    return deco


@register_scheme("memory")
def _memory(uri, rule, namespace, **kw):
    from guardian_plugin.ledger.memory import MemoryLedger

    return MemoryLedger(rule, namespace)


@register_scheme("sqlite")
def _sqlite(uri, rule, namespace, **kw):
    from guardian_plugin.ledger.sqlite import SQLiteLedger

    path = sqlite_path(uri)
    return SQLiteLedger(path, rule, namespace, **kw)


@register_scheme("redis")
def _redis(uri, rule, namespace, **kw):
    try:
        from guardian_plugin.ledger.redis import RedisLedger
    except ImportError as e:  # module or redis-py missing
        raise ConfigError(f"ledger {uri!r}: the redis backend needs `pip install redis` ({e})") from e
    return RedisLedger(uri, rule, namespace, **kw)


register_scheme("rediss")(_redis)  # TLS


def sqlite_path(uri: str) -> str:
    if not uri.startswith("sqlite://"):
        raise ConfigError(f"not a sqlite URI: {uri!r}")
    rest = uri[len("sqlite://"):]
    if rest.startswith("/"):
        rest = rest[1:] if rest.startswith("//") else rest  # sqlite:///abs -> /abs
    if not rest:
        raise ConfigError(f"ledger URI {uri!r} names no file")
    return rest


def open_ledger(uri: str, rule: RefusalRule | None = None, namespace: str = "default", **kw) -> Ledger:
    """Open the ledger a URI names. A bare path (no scheme) is taken as a SQLite file."""
    rule = rule or RefusalRule()
    scheme = urlparse(uri).scheme if "://" in uri else "sqlite"
    if "://" not in uri:
        uri = "sqlite:///" + uri.lstrip("/") if uri.startswith("/") else "sqlite://" + uri
    factory = LEDGER_SCHEMES.get(scheme)
    if factory is None:
        raise ConfigError(f"ledger {uri!r}: unknown scheme {scheme!r}; known: {', '.join(sorted(LEDGER_SCHEMES))}")
    return factory(uri, rule, namespace, **kw)


__all__ = ["ClientState", "Ledger", "RefusalRule", "open_ledger", "default_tau", "false_refusal_probability",
           "register_scheme", "LEDGER_SCHEMES"]
