"""Per-client quotas (Ledger.reserve_many) and the distribution test's bin blocks on every backend:
memory, SQLite (a real file), Redis (the suite's real server) and the failure-mode wrapper; atomic
across processes; `guardian clients` shows and resets the quota counts."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import sqlite3
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardian_plugin.cli import main
from guardian_plugin.errors import LedgerUnavailable
from guardian_plugin.ledger import open_ledger
from guardian_plugin.ledger.base import RefusalRule, dist_push
from guardian_plugin.ledger.resilient import ResilientLedger
from ledger_fixtures import core, durable_redis, fresh_namespace, old_sqlite_ledger, open_backend, redis_url  # noqa: F401

KINDS = ["memory", "sqlite", "redis", "resilient"]
P = 2  # quota period (s) of the tests that roll periods over: the Redis server's clock is real
LONG = 10**9  # a period no test run crosses (periods start at multiples of it since the epoch)


class Clock:
    """The time a ledger sees: a fake one for the backends that decide in Python (``base.now`` patched
    where it is imported), the server's own for Redis (then the helpers wait)."""

    def __init__(self, monkeypatch, led):
        self.led = led
        self.redis = hasattr(led, "r")
        self.t = time.time()
        if not self.redis:
            for mod in ("base", "memory", "sqlite", "cli"):
                monkeypatch.setattr(f"guardian_plugin.ledger.{mod}.now", lambda: self.t)

    def now(self) -> float:
        if self.redis:
            sec, usec = self.led.r.time()
            return sec + usec / 1e6
        return self.t

    def _to(self, t: float) -> None:
        if self.redis:
            time.sleep(max(0.0, t - self.now()))
        else:
            self.t = t

    def fresh_period(self, period: int) -> None:
        """Early in a period (Redis: at most 30% in, so a test has over a second before the next)."""
        t = self.now()
        if not self.redis or t % period > 0.3 * period:
            self._to((math.floor(t / period) + 1) * period + 0.02)

    def next_period(self, period: int) -> None:
        self._to((math.floor(self.now() / period) + 1) * period + 0.02)

    def later(self, seconds: float) -> None:
        self._to(self.now() + seconds)


@pytest.fixture
def quota_ledger(request, tmp_path, monkeypatch):
    """``make(rule) -> (ledger, clock)`` for the test's backend kind (``request.param``)."""
    made = []

    def make(rule):
        led = open_backend(request.param, rule, fresh_namespace("quota"), tmp_path)
        made.append(led)
        return led, Clock(monkeypatch, led)

    yield make
    for led in made:
        led.close()


def _quota_rule(**kw):
    kw.setdefault("quota_period_s", P)
    return RefusalRule(tau=1000, **kw)


def _grants(led, *requests):
    return [(r.granted, r.retry_after) for r in led.reserve_many(requests)]


# ------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("quota_ledger", KINDS, indirect=True)
def test_grants_up_to_the_quota_and_no_more(quota_ledger):
    led, clock = quota_ledger(_quota_rule(quota=5))
    clock.fresh_period(P)
    assert _grants(led, ("a", 3)) == [(3, None)]
    (g, retry), = _grants(led, ("a", 3))  # a partial grant says when the rest may be retried
    assert g == 2 and 0 < retry <= P
    (g, retry), = _grants(led, ("a", 1))
    assert g == 0 and 0 < retry <= P
    s = led.get("a")
    assert (s.period_queries, s.period_flagged, s.queries) == (5, 0, 0)  # reserved, not yet recorded
    assert s.known and s.period == math.floor(clock.now() / P)
    got = led.reserve_many([("b", 2), ("c", 9), ("d", 0)])  # one call, several clients, each its own quota
    assert [(r.state.client_id, r.granted) for r in got] == [("b", 2), ("c", 5), ("d", 0)]
    assert got[1].state.period_queries == 5 and got[0].retry_after is None and 0 < got[1].retry_after <= P
    assert not led.get("d").known  # nothing granted: nothing created
    s = led.record_many([("a", 5, 1)])[0]  # the answered queries: counted, flagged ones also per period
    assert (s.queries, s.flagged, s.period_queries, s.period_flagged) == (5, 1, 5, 1)


@pytest.mark.parametrize("quota_ledger", KINDS, indirect=True)
def test_the_next_period_starts_from_zero(quota_ledger):
    led, clock = quota_ledger(_quota_rule(quota=4, flagged_quota=100))
    clock.fresh_period(P)
    assert _grants(led, ("a", 9))[0][0] == 4
    led.record("a", 4, 2)
    first = led.get("a").period
    clock.next_period(P)
    s = led.get("a")
    assert s.period == first and s.period_counts(led.rule, clock.now()) == (0, 0)  # the old period's, stale
    assert _grants(led, ("a", 3)) == [(3, None)]
    s = led.get("a")
    assert (s.period, s.period_queries, s.period_flagged, s.queries, s.flagged) == (first + 1, 3, 0, 4, 2)
    clock.next_period(P)
    s = led.record("a", 2, 1)  # a record in a newer period than the stored one starts it at (0, flagged)
    assert (s.period, s.period_queries, s.period_flagged) == (first + 2, 0, 1)


@pytest.mark.parametrize("quota_ledger", KINDS, indirect=True)
def test_flagged_quota_blocks_further_grants(quota_ledger):
    led, clock = quota_ledger(_quota_rule(flagged_quota=2))
    clock.fresh_period(P)
    assert _grants(led, ("a", 10)) == [(10, None)]  # no query quota: all of them
    led.record("a", 10, 1)
    assert _grants(led, ("a", 5)) == [(5, None)]
    led.record("a", 5, 1)  # the second flagged answer of the period
    (g, retry), = _grants(led, ("a", 1))
    assert g == 0 and 0 < retry <= P
    assert not led.get("a").denied  # not refused: only out of quota until the period ends
    clock.next_period(P)
    assert _grants(led, ("a", 1)) == [(1, None)]


@pytest.mark.parametrize("quota_ledger", KINDS, indirect=True)
def test_refused_and_blocked_clients_get_nothing(quota_ledger):
    led, clock = quota_ledger(RefusalRule(tau=2, rho=0.5, quota=10, quota_period_s=P))
    clock.fresh_period(P)
    assert _grants(led, ("r", 2)) == [(2, None)]
    assert led.record("r", 2, 2).refused
    led.set_blocked("b", True)
    got = led.reserve_many([("r", 1), ("b", 1), ("ok", 1)])
    assert [(r.granted, r.retry_after) for r in got] == [(0, None), (0, None), (1, None)]
    assert got[0].state.refused and got[1].state.blocked
    assert (led.get("r").period_queries, led.get("b").period_queries) == (2, 0)  # nothing added


@pytest.mark.parametrize("quota_ledger", KINDS, indirect=True)
def test_without_quotas_reserve_is_a_read(quota_ledger):
    led, _ = quota_ledger(RefusalRule(tau=2, rho=0.5))
    assert _grants(led, ("a", 7), ("b", 3)) == [(7, None), (3, None)]
    assert led.clients() == []  # nothing written
    led.record("a", 2, 2)
    assert _grants(led, ("a", 7)) == [(0, None)]


@pytest.mark.parametrize("quota_ledger", KINDS, indirect=True)
def test_reset_quota_clears_only_the_period_counts(quota_ledger):
    led, clock = quota_ledger(RefusalRule(tau=3, rho=0.5, quota=3, quota_period_s=P))
    clock.fresh_period(P)
    assert _grants(led, ("a", 3)) == [(3, None)]
    led.record("a", 3, 2)  # refused too
    led.set_blocked("a", False)  # lifts the refusal, keeps the counts
    assert _grants(led, ("a", 1))[0][0] == 0
    led.reset_quota("a")
    s = led.get("a")
    assert (s.period, s.period_queries, s.period_flagged, s.queries, s.flagged) == (None, 0, 0, 3, 2)
    assert _grants(led, ("a", 2)) == [(2, None)]
    led.reset_quota("ghost")
    assert not led.get("ghost").known  # an unknown client stays unknown


@pytest.mark.parametrize("quota_ledger", KINDS, indirect=True)
def test_dist_blocks_roll_over_as_dist_push_says(quota_ledger):
    nbins, block = 3, 5
    led, _ = quota_ledger(RefusalRule(tau=1000, dist_bins=nbins, dist_block=block))
    # (bins of one update, the complete block after it); None: an update without bins; 4 bins: cut to 3
    steps = [((1, 0, 1), None), ((0, 2, 0), None), ((2, 0, 0), [3, 2, 1]), ((1, 1, 1, 9), [3, 2, 1]),
             (None, [3, 2, 1]), ((0, 0, 0), [3, 2, 1]), ((3, 3, 0), [4, 4, 1]), ((), [4, 4, 1]),
             ((5, 0, 0), [5, 0, 0])]
    cur, prev = None, None
    for bins, complete in steps:
        n = sum(bins[:nbins]) if bins else 1
        s = led.record_many([("c", n, 0, bins) if bins is not None else ("c", n, 0)])[0]
        if bins is not None:
            cur, prev = dist_push(cur, prev, bins, nbins, block)
        assert s.dist_counts == prev == complete and led.get("c").dist_counts == complete, (bins, s.dist_counts)
    assert led.record_many([("d", 1, 0)])[0].dist_counts is None
    off, _ = quota_ledger(RefusalRule(tau=1000))  # the test off: bins ignored
    assert off.record_many([("c", 9, 0, (9, 0, 0))])[0].dist_counts is None


# ------------------------------------------------ the same states everywhere, any sequence
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.sampled_from("ab"), st.integers(0, 7), st.just(None)),
        st.tuples(st.sampled_from(["record", "commit"]), st.sampled_from("ab"), st.integers(0, 6),
                  st.one_of(st.none(), st.lists(st.integers(0, 4), max_size=4))),
        st.tuples(st.sampled_from(["reset_quota", "reset", "block", "unblock"]), st.sampled_from("ab"),
                  st.just(0), st.just(None)),
    ),
    min_size=1, max_size=30,
)


def _full(s):
    return core(s) + (s.period, s.period_queries, s.period_flagged, s.dist_counts)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops, quota=st.integers(0, 9), fquota=st.integers(0, 3), tau=st.integers(1, 12),
       block=st.integers(1, 6))
def test_backends_agree_on_quotas_and_blocks(tmp_path_factory, ops, quota, fquota, tau, block):
    rule = RefusalRule(tau, 0.5, quota=quota, flagged_quota=fquota, quota_period_s=LONG, dist_bins=3,
                       dist_block=block)
    ns, tmp = fresh_namespace("qprop"), tmp_path_factory.mktemp("qprop")
    leds = {k: open_backend(k, rule, ns, tmp) for k in ("memory", "sqlite", "redis")}
    holds = {k: {} for k in leds}  # each backend's last hold per client (commit: its answers are sent)
    try:
        for op, c, n, bins in ops:
            if op == "reserve":
                got = {}
                for k, led in leds.items():
                    r, = led.reserve_many([(c, n)])
                    holds[k][c] = r.hold
                    got[k] = [(r.granted, r.retry_after is None, r.hold is None) + _full(r.state)]
            elif op in ("record", "commit"):
                u = (c, n, n // 2) if bins is None else (c, n, n // 2, bins)
                got = {k: [_full(s) for s in led.record_many(
                    [u], commit=[(c, holds[k].pop(c))] if op == "commit" and holds[k].get(c) else None)]
                    for k, led in leds.items()}
            elif op in ("reset_quota", "reset"):
                got = {k: (getattr(led, op)(c), _full(led.get(c)))[1:] for k, led in leds.items()}
            else:
                got = {k: [_full(led.set_blocked(c, op == "block"))] for k, led in leds.items()}
            assert got["redis"] == got["sqlite"] == got["memory"], (op, c, n, bins, got)
        lists = {k: [_full(s) for s in led.clients()] for k, led in leds.items()}
        assert lists["redis"] == lists["sqlite"] == lists["memory"]
    finally:
        for led in leds.values():
            led.close()


# ----------------------------------------------------------------- holds and their lease
LEASE = 1  # s; Redis's clock is real, so its tests wait that long


def _held(**kw):
    return _quota_rule(quota_period_s=LONG, quota_lease_s=LEASE, **kw)


@pytest.mark.parametrize("quota_ledger", KINDS, indirect=True)
def test_a_hold_never_committed_is_released_after_its_lease(quota_ledger):
    """The worker that reserved died before answering: once the lease has passed, the next reservation
    or any read of the client no longer counts those queries."""
    led, clock = quota_ledger(_held(quota=5))
    got = led.reserve_many([("a", 3), ("b", 2), ("c", 4)])
    assert [r.granted for r in got] == [3, 2, 4]
    assert got[0].hold and got[0].hold == got[1].hold == got[2].hold  # one hold per reservation
    assert _grants(led, ("a", 5))[0][0] == 2  # live holds count against the quota
    clock.later(LEASE + 0.05)
    assert _grants(led, ("a", 9))[0][0] == 5  # the next reservation releases: the whole quota again
    assert led.get("b").period_queries == 0  # so does a read
    assert {s.client_id: s.period_queries for s in led.clients()}["c"] == 0  # and a listing
    s = led.get("a")
    assert (s.queries, s.period_queries) == (0, 5)


@pytest.mark.parametrize("quota_ledger", KINDS, indirect=True)
def test_committed_holds_stay_counted(quota_ledger):
    led, clock = quota_ledger(_held(quota=5))
    h1 = led.reserve_many([("a", 3), ("b", 1)])[0].hold
    h2 = led.reserve_many([("a", 1)])[0].hold
    assert h1 != h2
    # 2 of a's 3 answered, the third a 400 that left in the same response: all three stay counted
    states = led.record_many([("a", 2, 1)], commit=[("a", h1), ("b", h1)])
    assert [(s.queries, s.period_queries, s.period_flagged) for s in states] == [(2, 4, 1)]
    assert led.record_many([], commit=[("a", h1)]) == []  # committing again changes nothing
    clock.later(LEASE + 0.05)
    s = led.get("a")
    assert (s.queries, s.flagged, s.period_queries, s.period_flagged) == (2, 1, 3, 1)  # h2 released
    assert led.get("b").period_queries == 1
    assert _grants(led, ("a", 5))[0][0] == 2


@pytest.mark.parametrize("quota_ledger", KINDS, indirect=True)
def test_a_commit_after_the_lease_counts_the_answers_not_the_hold_twice(quota_ledger):
    led, clock = quota_ledger(_held(quota=5))
    h = led.reserve_many([("a", 3)])[0].hold
    clock.later(LEASE + 0.05)
    assert _grants(led, ("a", 5))[0][0] == 5  # released: the quota is whole again
    s = led.record_many([("a", 3, 0)], commit=[("a", h)])[0]
    assert (s.queries, s.period_queries) == (3, 5)  # the late answers count; the period keeps the new grant


@pytest.mark.parametrize("quota_ledger", KINDS, indirect=True)
def test_reset_quota_and_reset_drop_the_holds(quota_ledger):
    led, clock = quota_ledger(_held(quota=5))
    led.reserve_many([("a", 3), ("b", 2)])
    led.reset_quota("a")
    led.reset("b")
    assert _grants(led, ("a", 4), ("b", 4)) == [(4, None), (4, None)]
    clock.later(LEASE + 0.05)  # the dropped holds release nothing from the new ones' counts
    assert (led.get("a").period_queries, led.get("b").period_queries) == (0, 0)


def test_bad_commits_are_refused():
    led = open_ledger("memory://", _held(quota=5), "x")
    for bad in ([("a",)], [("a", "")], [("", "t")], ["at"], [("a", 7)]):
        with pytest.raises(ValueError):
            led.record_many([], commit=bad)


def _holder(uri, ns, start, out):
    """Reserves one query at a time until the quota is used up, committing every other grant and
    abandoning the rest (a worker that died before answering)."""
    led = open_ledger(uri, RefusalRule(tau=1000, quota=40, quota_period_s=LONG, quota_lease_s=600), ns)
    start.wait(60)
    got = committed = 0
    while True:
        r = led.reserve_many([("one", 1)])[0]
        if not r.granted:
            break
        got += 1
        if got % 2:
            led.record_many([("one", 1, 0)], commit=[("one", r.hold)])
            committed += 1
    out.put((got, committed))
    led.close()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_processes_with_holds_outstanding_never_grant_more_than_the_quota(store, tmp_path):
    uri, ns, res = _four_processes(_holder, store, tmp_path)
    assert sum(g for g, _ in res) == 40, res  # abandoned holds still count: live, within their lease
    s = open_ledger(uri, RefusalRule(), ns).get("one")
    assert (s.queries, s.period_queries) == (sum(c for _, c in res), 40)


# ------------------------------------------------------------- atomic across processes
def _reserver(uri, ns, start, out):
    led = open_ledger(uri, RefusalRule(tau=1000, quota=100, quota_period_s=LONG), ns)
    start.wait(60)
    got, i = 0, 0
    while True:
        r = led.reserve_many([("one", 1 + i % 3)])[0]
        got += r.granted
        i += 1
        if r.retry_after is not None and r.granted == 0:
            break
    out.put(got)
    led.close()


def _four_processes(target, store, tmp_path):
    """Runs ``target(uri, ns, start, out)`` in four processes started together on one store (a fresh
    namespace); returns (uri, ns, what each put in ``out``)."""
    uri = f"sqlite:///{tmp_path}/l.db" if store == "sqlite" else redis_url()
    ns = fresh_namespace("qconc")
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(uri, ns, start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    res = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return uri, ns, res


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_processes_never_grant_more_than_the_quota_together(store, tmp_path):
    uri, ns, granted = _four_processes(_reserver, store, tmp_path)
    assert sum(granted) == 100, granted
    assert open_ledger(uri, RefusalRule(), ns).get("one").period_queries == 100


# ------------------------------------------------------------------- SQLite migration
def test_sqlite_file_from_before_quotas_is_migrated(tmp_path):
    uri = old_sqlite_ledger(tmp_path / "old.db", with_window=True)
    led = open_ledger(uri, RefusalRule(tau=100, quota=10, quota_period_s=LONG, dist_bins=2,
                                                       dist_block=3))
    s = led.get("old")
    assert (s.queries, s.flagged, s.period, s.period_queries, s.dist_counts) == (7, 2, None, 0, None)
    assert _grants(led, ("old", 4)) == [(4, None)]
    s = led.record_many([("old", 4, 1, (2, 2))])[0]
    assert (s.queries, s.period_queries, s.period_flagged, s.dist_counts) == (11, 4, 1, [2, 2])


# ------------------------------------------------------------------- store failures
def _locked(path):
    blocker = sqlite3.connect(str(path), isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    return blocker


def test_closed_mode_grants_nothing_while_down(tmp_path):
    path = tmp_path / "l.db"
    inner = open_ledger(f"sqlite:///{path}", RefusalRule(tau=100, quota=10, quota_period_s=LONG), "m", timeout_s=0.1)
    led = ResilientLedger(inner, "closed", retry_interval_s=0.05, background=False)
    assert _grants(led, ("a", 4)) == [(4, None)]
    blocker = _locked(path)
    with pytest.raises(LedgerUnavailable):
        led.reserve_many([("a", 1)])
    blocker.execute("COMMIT")
    blocker.close()
    time.sleep(0.06)
    (g, retry), = _grants(led, ("a", 9))
    assert g == 6 and retry is not None
    assert inner.get("a").period_queries == 10  # the failed reservation added nothing


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_a_commit_that_fails_while_down_is_written_when_the_store_is_back(tmp_path, mode):
    """docs/ledger.md: the counts of an update the store could not take are kept and written when it is
    back, and the quota holds it commits with them (before their lease ends) stay counted."""
    path = tmp_path / "l.db"
    inner = open_ledger(f"sqlite:///{path}", _held(quota=5), "m", timeout_s=0.1)
    led = ResilientLedger(inner, mode, retry_interval_s=0.05, background=False)
    h = led.reserve_many([("a", 3)])[0].hold
    blocker = _locked(path)
    if mode == "closed":
        with pytest.raises(LedgerUnavailable):
            led.record_many([("a", 2, 1)], commit=[("a", h)])
    else:
        assert led.record_many([("a", 2, 1)], commit=[("a", h)])[0].extra["unconfirmed"]
    blocker.execute("COMMIT")
    blocker.close()
    time.sleep(0.06)
    assert led.flush()
    time.sleep(LEASE + 0.05)  # past the lease: a hold not committed would be released now
    s = inner.get("a")
    assert (s.queries, s.flagged, s.period_queries, s.period_flagged) == (2, 1, 3, 1)


def test_open_mode_grants_unchecked_except_known_denied_and_replays_counts(tmp_path, caplog):
    path = tmp_path / "l.db"
    rule = RefusalRule(tau=2, rho=0.5, quota=3, quota_period_s=LONG, dist_bins=2, dist_block=100)
    inner = open_ledger(f"sqlite:///{path}", rule, "m", timeout_s=0.1)
    led = ResilientLedger(inner, "open", retry_interval_s=0.05, background=False)
    led.reserve_many([("bad", 2), ("ok", 3)])
    assert led.record_many([("bad", 2, 2, (1, 1)), ("ok", 3, 0, (3, 0))])[0].refused
    blocker = _locked(path)
    with caplog.at_level(logging.ERROR, logger="guardian_plugin.ledger"):
        got = led.reserve_many([("ok", 5), ("bad", 5), ("new", 2)])  # ok is over its quota: unchecked now
    assert [r.granted for r in got] == [5, 0, 2] and all(r.state.extra.get("unconfirmed") for r in got)
    assert led.stats["granted_unchecked"] == 7
    assert any("WITHOUT the quotas" in r.message and r.levelno == logging.ERROR for r in caplog.records)
    states = led.record_many([("ok", 5, 1, (4, 1)), ("new", 2, 0)])  # a 4-tuple and a triple, held here
    assert [s.queries for s in states] == [8, 2] and led.pending_counts() == (7, 1)
    blocker.execute("COMMIT")
    blocker.close()
    time.sleep(0.06)
    assert led.flush() and not led.down
    ok, new = inner.get("ok"), inner.get("new")
    assert (ok.queries, ok.flagged, new.queries) == (8, 1, 2)  # queries and flagged replayed exactly
    assert ok.period_queries == 3  # the unchecked grants did not go through the store
    assert ok.period_flagged == 1  # the held record's flagged query counts in the period when written
    # the held update's bins were written with its counts: the current block is (3, 0) + (4, 1)
    assert inner.record_many([("ok", 97, 0, (0, 97))])[0].dist_counts == [7, 98]


def test_redis_replay_of_updates_with_bins_counts_once(durable_redis):
    rule = RefusalRule(tau=1000, quota=50, quota_period_s=LONG, dist_bins=2, dist_block=4)
    inner = open_ledger(durable_redis.url, rule, "m")
    led = ResilientLedger(inner, "open", retry_interval_s=0.05, background=False)
    assert _grants(led, ("c", 10)) == [(10, None)]
    led.record_many([("c", 1, 0, (1, 0))])
    durable_redis.kill()
    s = led.record_many([("c", 3, 1, (2, 1))])[0]  # fails: kept as a replay (its fate unknown)
    assert s.extra.get("unconfirmed") and s.queries == 4 and led.pending_counts() == (3, 1)
    assert led.reserve_many([("c", 2)])[0].granted == 2  # open mode, store down
    durable_redis.start()
    time.sleep(0.06)
    assert led.flush() and led.pending_counts() == (0, 0)
    s = inner.get("c")
    assert (s.queries, s.flagged, s.period_queries, s.period_flagged) == (4, 1, 10, 1)
    assert s.dist_counts == [3, 1]  # a replay resends the whole update, bins included
    led.close()


# ----------------------------------------------------------------------- guardian clients
def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(params=["sqlite", "redis"])
def quota_store(request, tmp_path):
    ns = fresh_namespace("qcli")
    uri = f"sqlite:///{tmp_path}/ledger.db" if request.param == "sqlite" else redis_url()
    led = open_ledger(uri, RefusalRule(tau=100, quota=10, flagged_quota=3, quota_period_s=LONG), ns)
    led.reserve_many([("alice", 4), ("bob", 12)])
    led.record_many([("alice", 4, 1), ("bob", 10, 3)])
    led.record("carol", 2, 0)
    yield uri, ns, led
    led.close()


def test_clients_shows_and_resets_quota_usage(quota_store, capsys):
    uri, ns, led = quota_store
    base = ["--ledger", uri, "--namespace", ns, "--quota", "10", "--flagged-quota", "3",
            "--quota-period", str(LONG)]
    rc, out, err = run(capsys, "clients", "list", *base)
    assert rc == 0 and not err
    lines = out.strip().splitlines()
    head = lines[1].split()
    assert head[6:8] == ["PERIOD_Q", "PERIOD_F"]
    rows = {ln.split()[0]: ln.split()[6:8] for ln in lines[2:]}
    assert rows == {"alice": ["4/10", "1/3"], "bob": ["10/10", "3/3"], "carol": ["0/10", "0/3"]}

    rc, out, _ = run(capsys, "clients", "show", "bob", *base, "--json")
    u = json.loads(out)["client"]["quota_usage"]
    assert (u["queries"], u["flagged"], u["quota"], u["flagged_quota"], u["period_s"]) == (10, 3, 10, 3, LONG)
    assert 0 < u["resets_in_s"] <= LONG

    rc, out, _ = run(capsys, "clients", "reset-quota", "bob", *base, "--json")
    c = json.loads(out)["clients"][0]
    assert rc == 0 and (c["queries"], c["flagged"], c["quota_usage"]["queries"], c["period"]) == (10, 3, 0, None)
    assert led.reserve_many([("bob", 2)])[0].granted == 2 and led.get("alice").period_queries == 4
    rc, _, err = run(capsys, "clients", "reset-quota", "nobody", "alice", *base)
    assert rc == 1 and "no client 'nobody'" in err and led.get("alice").period_queries == 4  # nothing changed

    # without the guard's period: the counts are read in 1-day periods, and a note says so
    rc, out, err = run(capsys, "clients", "list", "--ledger", uri, "--namespace", ns)
    assert rc == 0 and "PERIOD_Q" in out and "--quota-period" in err
    rc, _, err = run(capsys, "clients", "list", "--ledger", uri, "--namespace", ns, "--quota", "-1")
    assert rc == 2 and err.startswith("guardian clients: error: --quota: quota must be >= 0")


def test_clients_without_quotas_shows_no_quota_columns(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/l.db"
    open_ledger(uri, RefusalRule(tau=100, window=5), "cfgns").record("w", 8, 3)
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(yaml.safe_dump({"detector": "det", "ledger": uri, "namespace": "cfgns",
                                   "rule": {"tau": 100, "window": 5}, "quota": {"queries": 0, "flagged": 0}}))
    rc, out, err = run(capsys, "clients", "list", "--config", str(cfg))
    assert rc == 0 and "PERIOD_Q" not in out and "WINDOW" in out and not err
    rc, out, _ = run(capsys, "clients", "show", "w", "--config", str(cfg), "--json")
    assert "quota_usage" not in json.loads(out)["client"]
    # a quota given on the command line keeps the config's window
    rc, out, _ = run(capsys, "clients", "list", "--config", str(cfg), "--quota", "5")
    assert rc == 0 and "WINDOW" in out and "0/5" in out and "PERIOD_Q" in out
    # the shipped quota defaults of a guard config show without any option
    cfg.write_text(yaml.safe_dump({"detector": "det", "ledger": uri, "namespace": "cfgns"}))
    rc, out, _ = run(capsys, "clients", "list", "--config", str(cfg))
    assert rc == 0 and "0/10000" in out


def _open_at_once(path, barrier, out):
    barrier.wait()
    try:
        led = open_ledger(f"sqlite:///{path}", RefusalRule(tau=100, quota=10), "race")
        led.record("c", 1, 0)
        out.put("ok")
    except Exception as e:  # noqa: BLE001 - reported to the parent
        out.put(repr(e))


def test_workers_opening_a_fresh_sqlite_file_at_once_all_succeed(tmp_path):
    """TorchServe loads a model's workers together: every one opens (creates, switches to WAL, migrates)
    the same fresh ledger file at the same moment; none may fail with "database is locked"."""
    ctx = mp.get_context("spawn")
    for trial in range(3):
        path = tmp_path / f"fresh-{trial}.db"
        barrier, out = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_open_at_once, args=(str(path), barrier, out)) for _ in range(6)]
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
        assert results == ["ok"] * 6, results
        assert open_ledger(f"sqlite:///{path}", RefusalRule(tau=100), "race").get("c").queries == 6
