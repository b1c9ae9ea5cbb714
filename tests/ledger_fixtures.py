"""Shared by the ledger tests: the suite's Redis (scripts/test.sh starts it) and fresh namespaces.

Tests that need Redis FAIL, never skip, when GUARDIAN_TEST_REDIS_URL is missing: run them with
`make test` (or scripts/test.sh), which starts a real redis-server and exports it.
"""

from __future__ import annotations

import os
import uuid

import pytest

from guardian_plugin.ledger import open_ledger
from guardian_plugin.ledger.base import RefusalRule


def redis_url() -> str:
    url = os.environ.get("GUARDIAN_TEST_REDIS_URL")
    if not url:
        pytest.fail("GUARDIAN_TEST_REDIS_URL is not set: run the tests through `make test` / scripts/test.sh, "
                    "which start a real redis-server, or export GUARDIAN_TEST_REDIS_URL=redis://127.0.0.1:PORT/0",
                    pytrace=False)
    return url


@pytest.fixture
def redis_uri() -> str:
    return redis_url()


@pytest.fixture
def durable_redis():
    """A redis-server of the test's own that keeps its data across kill() and start()."""
    from guardian_plugin.devserver.redis import RedisServer

    with RedisServer(durable=True) as srv:
        yield srv


def fresh_namespace(tag: str = "t") -> str:
    return f"test-{tag}-{uuid.uuid4().hex[:12]}"


def open_backend(kind: str, rule: RefusalRule, namespace: str, tmp_path) -> "object":
    """memory | sqlite | redis ledger with this rule and namespace (Redis: the suite's server), or
    resilient: the failure-mode wrapper (open mode, no background thread) over a SQLite one."""
    if kind == "resilient":
        from guardian_plugin.ledger.resilient import ResilientLedger

        return ResilientLedger(open_backend("sqlite", rule, namespace, tmp_path), "open", background=False)
    if kind == "memory":
        return open_ledger("memory://", rule, namespace)
    if kind == "sqlite":
        return open_ledger(f"sqlite:///{tmp_path}/ledger.db", rule, namespace)
    if kind == "redis":
        return open_ledger(redis_url(), rule, namespace)
    raise ValueError(kind)


def old_sqlite_ledger(path, with_window: bool) -> str:
    """A SQLite ledger file as an earlier release wrote it (before the window column when
    ``with_window`` is False, before the quota and distribution columns otherwise), holding one client
    'old' (7 queries, 2 flagged, seen a minute ago). Returns its URI."""
    import sqlite3
    import time

    con = sqlite3.connect(str(path))
    con.execute("""CREATE TABLE clients (namespace TEXT NOT NULL, client_id TEXT NOT NULL,
        queries INTEGER NOT NULL DEFAULT 0, flagged INTEGER NOT NULL DEFAULT 0, refused INTEGER NOT NULL DEFAULT 0,
        blocked INTEGER NOT NULL DEFAULT 0, refused_at_query INTEGER, first_seen REAL, last_seen REAL,"""
                + (" win TEXT," if with_window else "") + " PRIMARY KEY (namespace, client_id))")
    t = time.time()  # seen just now: the default retention keeps it
    con.execute("INSERT INTO clients VALUES ('default', 'old', 7, 2, 0, 0, NULL, ?, ?" + (", NULL)" if with_window else ")"),
                (t - 60, t))
    con.commit()
    con.close()
    return f"sqlite:///{path}"


def core(s) -> tuple:
    """What every backend must agree on for a client."""
    return (s.client_id, s.queries, s.flagged, s.refused, s.blocked, s.refused_at_query,
            s.extra.get("window", 0), s.extra.get("window_flagged", 0))


def tiny_detector(directory, threshold: float = 0.0, mean=(0.0,), std=(1.0,)) -> str:
    """A one-sub-detector artifact (identity transform, random small ResNet) for tests of the
    plumbing around the detector; ``threshold=-1e30`` flags every query, ``1e30`` none."""
    from guardian_plugin.detector import DetectorSpec, InputMapping, SubDetector, SubDetectorSpec, save_detector

    spec = DetectorSpec(format_version=1, input=InputMapping(mean=list(mean), std=list(std)),
                        subdetectors=[SubDetectorSpec(name="s", transform="identity", weights="s.pt",
                                                      threshold=threshold)])
    save_detector(str(directory), spec, [SubDetector("small_resnet", 1, 28)])
    return str(directory)
