"""Failure modes (ResilientLedger): a real redis-server killed with SIGKILL mid-run and started again,
and a SQLite file locked by another writer. Closed mode raises LedgerUnavailable (HTTP 503 in the
adapters), open mode serves; in both, once the store is back it holds exactly the queries handed to
the ledger."""

from __future__ import annotations

import logging
import multiprocessing as mp
import sqlite3
import time

import pytest

from guardian_plugin.config import parse_config
from guardian_plugin.errors import LedgerUnavailable
from guardian_plugin.ledger import open_ledger
from guardian_plugin.ledger.base import RefusalRule
from guardian_plugin.devserver.redis import RedisServer
from guardian_plugin.ledger.resilient import ResilientLedger
from ledger_fixtures import durable_redis, tiny_detector  # noqa: F401


def _wait_for(cond, timeout_s=60.0):  # returns as soon as cond holds; long for a loaded machine
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_closed_mode_raises_while_down_and_loses_nothing(durable_redis, caplog):
    inner = open_ledger(durable_redis.url, RefusalRule(tau=1000), "m")
    led = ResilientLedger(inner, "closed", retry_interval_s=0.1)
    ok = failed = 0
    for i in range(600):
        if i == 200:
            durable_redis.kill()
        if i == 400:
            durable_redis.start()
            time.sleep(0.15)  # past the retry interval: the next call reaches the store again
        try:
            led.record("c", 1, i % 2)
            ok += 1
        except LedgerUnavailable:
            failed += 1
        if 200 < i < 400:
            with pytest.raises(LedgerUnavailable):
                led.is_denied("c")  # the adapter answers 503 before running the model
        time.sleep(0.001)
    assert failed >= 150 and ok >= 400
    assert led.flush()
    s = inner.get("c")
    assert (s.queries, s.flagged) == (600, 300)  # every update handed to the ledger, once
    assert led.pending_counts() == (0, 0)
    assert any("LEDGER STORE UNAVAILABLE" in r.message and r.levelno == logging.ERROR for r in caplog.records)
    led.close()


def test_open_mode_serves_refuses_locally_and_loses_nothing(durable_redis, caplog):
    inner = open_ledger(durable_redis.url, RefusalRule(tau=50, rho=0.5), "m")
    led = ResilientLedger(inner, "open", retry_interval_s=0.1)
    for _ in range(10):
        led.record("attacker", 1, 1)
        led.record("benign", 1, 0)
    durable_redis.kill()
    states = []
    for _ in range(60):  # served throughout, no exception
        states.append(led.record("attacker", 1, 1))
        led.record("benign", 1, 0)
    assert all(s.extra.get("unconfirmed") for s in states)
    # refused locally at the same query the store would have refused it: tau
    first = next(s for s in states if s.refused)
    assert first.refused_at_query == 50 and first.queries == 50
    assert led.is_denied("attacker") and not led.is_denied("benign")
    assert any("serving WITHOUT the shared refusal state" in r.message for r in caplog.records)
    durable_redis.start()
    # no further calls: the background flusher writes the held counts once the store is back
    assert _wait_for(lambda: led.pending_counts() == (0, 0))
    a, b = inner.get("attacker"), inner.get("benign")
    assert (a.queries, a.flagged, b.queries, b.flagged) == (70, 70, 70, 0)
    assert a.refused and not b.refused
    assert not led.down
    led.close()


def test_a_commit_whose_reply_is_lost_is_replayed_once_with_its_counts(durable_redis):
    """Redis killed under a commit: its fate is unknown, so the replay (same writer and sequence number)
    carries the commit too; once the store is back the counts and the committed hold are there once."""
    rule = RefusalRule(tau=1000, quota=5, quota_period_s=10**9, quota_lease_s=1)
    inner = open_ledger(durable_redis.url, rule, "hold")
    led = ResilientLedger(inner, "closed", retry_interval_s=0.05, background=False)
    h = led.reserve_many([("a", 3)])[0].hold
    durable_redis.kill()
    with pytest.raises(LedgerUnavailable):
        led.record_many([("a", 3, 1)], commit=[("a", h)])
    durable_redis.start()
    assert _wait_for(led.flush)
    time.sleep(1.05)  # past the lease
    s = inner.get("a")
    assert (s.queries, s.flagged, s.period_queries) == (3, 1, 3)
    assert led.flush() and led.pending_counts() == (0, 0)
    led.close()


def _worker(url, mode, ns, stop, out):
    led = ResilientLedger(open_ledger(url, RefusalRule(tau=10**6), ns), mode, retry_interval_s=0.1)
    sent = raised = 0
    while not stop.is_set():
        try:
            led.record("shared", 1, sent % 3 == 0)
        except LedgerUnavailable:
            raised += 1
        sent += 1
        time.sleep(0.0005)  # a client's pace, not a spin loop (the machine is shared)
    deadline = time.time() + 20
    while led.pending_counts() != (0, 0) and time.time() < deadline:
        led.flush()
        time.sleep(0.1)
    q, _ = led.pending_counts()
    flagged = sum(1 for i in range(sent) if i % 3 == 0)
    out.put((sent, flagged, raised, q))
    led.close()


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_redis_killed_mid_run_by_several_processes(durable_redis, mode):
    """Acceptance: 3 processes update one client; redis-server gets SIGKILL mid-run and comes back;
    the final counts equal the updates sent, whatever the mode (closed: some raised)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    stop = ctx.Event()  # the workers update until the store is back (not a wall-clock end: spawning
    # three interpreters on a loaded machine can take longer than any fixed run time)
    procs = [ctx.Process(target=_worker, args=(durable_redis.url, mode, "kill", stop, out)) for _ in range(3)]
    for p in procs:
        p.start()
    inner = open_ledger(durable_redis.url, RefusalRule(), "kill")
    assert _wait_for(lambda: inner.get("shared").queries > 300, 60)  # the workers are running
    durable_redis.kill()
    time.sleep(1.0)
    durable_redis.start()
    time.sleep(1.0)
    stop.set()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    sent = sum(r[0] for r in results)
    flagged = sum(r[1] for r in results)
    raised = sum(r[2] for r in results)
    assert all(r[3] == 0 for r in results), results  # nothing left unwritten
    if mode == "closed":
        assert raised > 0
    else:
        assert raised == 0
    s = inner.get("shared")
    print(f"{mode}: sent={sent} raised={raised} store={s.queries}/{s.flagged} per process={results}")
    assert (s.queries, s.flagged) == (sent, flagged), (results, s)


def test_sqlite_locked_by_another_writer(tmp_path):
    """Any backend: a SQLite file held by another writer past the busy timeout is an unavailable store."""
    path = tmp_path / "l.db"
    inner = open_ledger(f"sqlite:///{path}", RefusalRule(), "m", timeout_s=0.1)
    closed = ResilientLedger(inner, "closed", retry_interval_s=0.05, background=False)
    opened = ResilientLedger(open_ledger(f"sqlite:///{path}", RefusalRule(), "m", timeout_s=0.1), "open",
                             retry_interval_s=0.05, background=False)
    closed.record("c", 1, 0)
    blocker = sqlite3.connect(str(path), isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    with pytest.raises(LedgerUnavailable):
        closed.record("c", 2, 1)
    s = opened.record("c", 3, 0)
    assert s.extra.get("unconfirmed") and s.queries >= 3
    blocker.execute("COMMIT")
    blocker.close()
    time.sleep(0.06)
    assert closed.flush() and opened.flush()
    s = inner.get("c")
    assert (s.queries, s.flagged) == (6, 1)


def test_closed_mode_fails_fast_while_down(tmp_path):
    """While the store is known down, calls do not wait on it again until the retry interval passes."""
    with RedisServer(durable=False) as srv:
        led = ResilientLedger(open_ledger(srv.url, RefusalRule(), "m"), "closed", retry_interval_s=30,
                              background=False)
        led.record("c", 1, 0)
        srv.kill()
        with pytest.raises(LedgerUnavailable):
            led.record("c", 1, 0)
        t0 = time.monotonic()
        for _ in range(1000):
            with pytest.raises(LedgerUnavailable):
                led.is_denied("c")
        assert time.monotonic() - t0 < 1.0
        assert led.pending_counts() == (1, 0)


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_guardian_from_config_uses_the_mode(tmp_path, mode):
    """Guardian.from_config wraps the configured ledger; with the store down, closed mode raises
    LedgerUnavailable out of refused()/inspect() (the adapters' 503) and open mode answers."""
    import torch

    from guardian_plugin.guardian import Guardian, Verdict

    det = tiny_detector(tmp_path / "det")
    with RedisServer(durable=True) as srv:
        cfg = parse_config({"detector": det, "ledger": srv.url, "namespace": "g", "ledger_failure": mode,
                            "rule": {"tau": 5, "rho": 0.5, "window": 7, "window_rho": 0.4}})
        g = Guardian.from_config(cfg)
        assert isinstance(g.ledger, ResilientLedger) and g.ledger.mode == mode
        # the shipped quota defaults come with it (docs/refusal-rule.md)
        assert g.ledger.rule == RefusalRule(5, 0.5, window=7, window_rho=0.4, quota=10_000, flagged_quota=1_000)
        x, p = torch.rand(3, 1, 28, 28), torch.softmax(torch.randn(3, 10), 1)
        ids = ["a", "a", "b"]
        g.inspect(x, p, ids)
        srv.kill()
        if mode == "closed":
            with pytest.raises(LedgerUnavailable):
                g.refused(ids)
            with pytest.raises(LedgerUnavailable):
                g.inspect(x, p, ids, refused=[False] * 3)
        else:
            assert g.refused(ids) == [False] * 3
            r = g.inspect(x, p, ids)
            assert all(v in (Verdict.BENIGN, Verdict.FLAGGED) for v in r.verdicts)
        srv.start()
        assert _wait_for(lambda: g.ledger.pending_counts() == (0, 0))
        assert g.ledger.inner.get("a").queries == 4 and g.ledger.inner.get("b").queries == 2
        g.ledger.close()


def test_config_field_and_guardian_wiring():
    cfg = parse_config({"detector": "d"})
    assert cfg.ledger_failure == "closed"
    assert parse_config({"detector": "d", "ledger_failure": "open"}).ledger_failure == "open"
    from guardian_plugin.errors import ConfigError

    with pytest.raises(ConfigError, match="ledger_failure"):
        parse_config({"detector": "d", "ledger_failure": "sometimes"})
    with pytest.raises(ValueError):
        ResilientLedger(open_ledger("memory://"), "maybe")


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_distribution_bins_held_while_down_reach_the_store(tmp_path, mode):
    """The distribution test's bin counts of updates held while the store is down are written with their
    counts when it returns (they used to be dropped: the histogram missed every query served meanwhile)."""
    path = tmp_path / "l.db"
    rule = RefusalRule(dist_bins=3, dist_block=4)
    inner = open_ledger(f"sqlite:///{path}", rule, "m", timeout_s=0.1)
    led = ResilientLedger(inner, mode, retry_interval_s=0.05, background=False)
    led.record_many([("c", 2, 0, (1, 1, 0))])  # current block [1, 1, 0]: not complete
    blocker = sqlite3.connect(str(path), isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    for update in [("c", 3, 1, (0, 2, 1)), ("c", 1, 0, (0, 0, 1))]:
        if mode == "closed":
            with pytest.raises(LedgerUnavailable):
                led.record_many([update])
        else:
            assert led.record_many([update])[0].extra.get("unconfirmed")
    assert led.pending_counts() == (4, 1)
    blocker.execute("COMMIT")
    blocker.close()
    time.sleep(0.06)
    assert led.flush()
    s = inner.get("c")
    assert (s.queries, s.flagged) == (6, 1)
    assert s.dist_counts == [1, 3, 2]  # the held bins completed the block
    led.close()
