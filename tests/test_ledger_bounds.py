"""The Ledger template and bounded state: arguments checked and store failures translated once for
every backend, schemes registered from the classes, one default tau, idle clients forgotten (refused
and blocked ones kept)."""

from __future__ import annotations

import sys
import time

import pytest

from guardian_plugin.config import parse_config
from guardian_plugin.errors import ConfigError, LedgerUnavailable
from guardian_plugin.ledger import (DEFAULT_RETENTION_S, LEDGERS, MAX_CLIENT_ID_LENGTH, MemoryLedger, RedisLedger,
                                    SQLiteLedger, open_ledger)
from guardian_plugin.ledger.base import RefusalRule, default_tau
from guardian_plugin.ledger.resilient import ResilientLedger
from ledger_fixtures import fresh_namespace, open_backend, redis_uri, redis_url  # noqa: F401

BACKENDS = ["memory", "sqlite", "redis", "resilient"]


def test_one_default_tau():
    assert RefusalRule().tau == default_tau() == default_tau(0.5, 0.05, 1e-6) == 14
    assert parse_config({"detector": "d"}).rule.to_rule().tau == RefusalRule().tau  # YAML tau: auto
    assert RefusalRule(rho=0.5).tau == 14 and RefusalRule(7).tau == 7


def test_schemes_come_from_the_classes():
    assert {s: LEDGERS.get(s) for s in LEDGERS.names()} == {
        "memory": MemoryLedger, "sqlite": SQLiteLedger, "redis": RedisLedger, "rediss": RedisLedger}
    assert isinstance(open_ledger("memory://"), MemoryLedger)
    with pytest.raises(ConfigError, match="unknown scheme 'mongo'; known: memory, redis, rediss, sqlite"):
        open_ledger("mongo://x")


def test_redis_scheme_without_redis_py(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` raises ImportError
    assert isinstance(open_ledger("memory://"), MemoryLedger)
    with pytest.raises(ConfigError, match="pip install redis"):
        open_ledger("redis://127.0.0.1:6379/0")


@pytest.mark.parametrize("kind", BACKENDS)
def test_arguments_checked_the_same_everywhere(kind, tmp_path):
    led = open_backend(kind, RefusalRule(tau=4), fresh_namespace("args"), tmp_path)
    long_id = "x" * MAX_CLIENT_ID_LENGTH
    assert led.record(long_id, 2, 1).queries == 2  # the longest allowed id
    for bad in ("", "x" * (MAX_CLIENT_ID_LENGTH + 1), None, 7, b"bytes"):
        for call in (lambda: led.record(bad, 1, 0), lambda: led.get(bad), lambda: led.reset(bad),
                     lambda: led.set_blocked(bad, True), lambda: led.is_denied(bad)):
            with pytest.raises(ValueError):
                call()
    for q, f in [(-1, 0), (1, 2), (0, -1), (1.5, 0), ("3", 1), (None, 0)]:
        with pytest.raises(ValueError):
            led.record_many([("ok", 1, 0), ("c", q, f)])  # one bad update: none applied
    assert [s.client_id for s in led.clients()] == [long_id]
    assert led.record_many([]) == []


@pytest.mark.parametrize("kind", BACKENDS)
def test_unblocking_an_unknown_client_creates_nothing(kind, tmp_path):
    led = open_backend(kind, RefusalRule(tau=4), fresh_namespace("unb"), tmp_path)
    s = led.set_blocked("ghost", False)
    assert not s.known and not s.denied and led.clients() == []
    assert led.set_blocked("ghost", True).known and [c.client_id for c in led.clients()] == ["ghost"]


@pytest.mark.parametrize("kind", BACKENDS)
def test_refuse_is_sticky_and_adds_no_counts(kind, tmp_path):
    """Ledger.refuse (a client that crossed the rule inside a request that was not answered): refused
    at its current count, nothing added, the first refusal kept, unblock lifts it as it lifts the rule's."""
    led = open_backend(kind, RefusalRule(tau=4), fresh_namespace("ref"), tmp_path)
    led.record_many([("c", 3, 2)])
    s = led.refuse("c")
    assert (s.queries, s.flagged, s.refused, s.refused_at_query, s.blocked) == (3, 2, True, 3, False)
    led.record_many([("c", 2, 0)])
    s = led.refuse("c")
    assert (s.queries, s.refused, s.refused_at_query) == (5, True, 3)
    assert led.get("c").refused and led.reserve_many([("c", 1)])[0].granted == 0
    assert led.refuse("new").refused and led.get("new").queries == 0
    assert not led.set_blocked("c", False).refused


def test_sqlite_failures_become_ledger_unavailable(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(LedgerUnavailable, match="not a database"):
        open_ledger(f"sqlite:///{junk}")
    with pytest.raises(LedgerUnavailable, match="unable to open"):
        open_ledger(f"sqlite:///{tmp_path}")  # a directory
    led = open_ledger(f"sqlite:///{tmp_path}/ok.db")
    led.record("c", 1, 0)
    led.close()
    junk.rename(tmp_path / "ok.db")  # the next call opens a fresh connection on it
    with pytest.raises(LedgerUnavailable):
        led.get("c")
    wrapped = ResilientLedger(led, "closed", background=False)
    with pytest.raises(LedgerUnavailable):
        wrapped.get("c")


def test_sqlite_must_exist_creates_nothing(tmp_path):
    with pytest.raises(ConfigError, match="no such SQLite file"):
        open_ledger(f"sqlite:///{tmp_path}/a/b.db", must_exist=True)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- retention
def test_retention_defaults_and_uri():
    assert DEFAULT_RETENTION_S == 30 * 86400
    assert SQLiteLedger(":memory:", RefusalRule()).retention_s == DEFAULT_RETENTION_S
    assert open_ledger("redis://127.0.0.1:1/0", RefusalRule(), "n").retention_s == DEFAULT_RETENTION_S
    assert open_ledger("redis://127.0.0.1:1/0?retention=0", RefusalRule(), "n").retention_s == 0


def test_sqlite_forgets_idle_clients_keeps_refused_and_blocked(tmp_path):
    led = open_ledger(f"sqlite:///{tmp_path}/l.db?retention=1s", RefusalRule(tau=2, rho=0.5), "ns")
    keep = open_ledger(f"sqlite:///{tmp_path}/l.db?retention=0", RefusalRule(tau=2, rho=0.5), "forever")
    assert led.retention_s == 1 and keep.retention_s == 0
    led.record("idle", 1, 0)
    led.record("bad", 2, 2)  # refused
    led.set_blocked("blocked", True)
    keep.record("idle", 1, 0)
    time.sleep(1.2)
    led.record("fresh", 1, 0)  # a write prunes (at most once per retention here)
    keep.record("other", 1, 0)
    assert [s.client_id for s in led.clients()] == ["bad", "blocked", "fresh"]
    assert not led.get("idle").known and led.get("bad").refused and led.get("blocked").blocked
    assert [s.client_id for s in keep.clients()] == ["idle", "other"]  # retention=0: kept forever


def test_redis_default_retention_and_forever(redis_uri):
    ns = fresh_namespace("ret")
    led = open_ledger(redis_uri, RefusalRule(tau=2, rho=0.5), ns)
    led.record("c", 1, 0)
    assert DEFAULT_RETENTION_S - 5 < led.r.ttl(led.key("c")) <= DEFAULT_RETENTION_S
    led.record("c", 2, 2)  # refused: kept
    assert led.r.ttl(led.key("c")) == -1
    forever = open_ledger(redis_uri + "?retention=0", RefusalRule(), ns)
    forever.record("d", 1, 0)
    assert forever.r.ttl(forever.key("d")) == -1


def test_redis_forgets_idle_clients_keeps_refused_and_blocked(redis_uri):
    led = open_ledger(redis_uri + "?retention=1s", RefusalRule(tau=2, rho=0.5), fresh_namespace("ret1"))
    led.record("idle", 1, 0)
    led.record("bad", 2, 2)
    led.set_blocked("blocked", True)
    time.sleep(1.3)
    assert [s.client_id for s in led.clients()] == ["bad", "blocked"]
