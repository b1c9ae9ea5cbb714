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
