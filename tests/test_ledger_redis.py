"""The Redis ledger against a real redis-server: same rule as SQLite/memory, atomic across processes,
namespaces, retention, SCAN listing, exactly-once replays."""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardian_plugin.errors import ConfigError, LedgerUnavailable
from guardian_plugin.ledger import open_ledger
from guardian_plugin.ledger.base import RefusalRule
from guardian_plugin.ledger.redis import RedisLedger, parse_duration
from guardian_plugin.devserver.netutil import free_port
from ledger_fixtures import core, fresh_namespace, open_backend, redis_uri, redis_url  # noqa: F401


def test_open_ledger_picks_redis(redis_uri):
    led = open_ledger(redis_uri, RefusalRule(), fresh_namespace())
    assert isinstance(led, RedisLedger)
    assert led.ping()


def test_rule_at_exactly_tau_and_rho(redis_uri):
    led = open_ledger(redis_uri, RefusalRule(tau=4, rho=0.5), fresh_namespace())
    # share exactly rho at tau: not refused (the rule is flagged/queries > rho)
    s = led.record("c", 4, 2)
    assert (s.queries, s.flagged, s.refused) == (4, 2, False)
    s = led.record("c", 1, 1)  # 3/5 > 0.5 and 5 >= tau
    assert s.refused and s.refused_at_query == 5
    # below tau never refuses, whatever the share
    s = led.record("d", 3, 3)
    assert not s.refused
    s = led.record("d", 1, 1)  # the 4th query: tau reached
    assert s.refused and s.refused_at_query == 4
    # sticky: benign queries afterwards do not lift it
    s = led.record("d", 100, 0)
    assert s.refused and s.refused_at_query == 4 and s.queries == 104
    assert led.is_denied("d") and not led.is_denied("never-seen")


def test_bad_updates_rejected(redis_uri):
    led = open_ledger(redis_uri, RefusalRule(), fresh_namespace())
    for q, f in [(-1, 0), (1, 2), (0, -1)]:
        with pytest.raises(ValueError):
            led.record("c", q, f)
    assert led.clients() == []


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("rec"), st.sampled_from("abc"), st.integers(0, 6), st.integers(0, 6)),
        st.tuples(st.sampled_from(["block", "unblock", "reset"]), st.sampled_from("abc"), st.just(0), st.just(0)),
    ),
    min_size=1, max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops, tau=st.integers(1, 12), rho=st.sampled_from([0.0, 0.25, 0.3, 0.5, 0.75, 0.9]),
       window=st.sampled_from([0, 1, 3, 5, 8]), wrho=st.sampled_from([None, 0.2, 0.5, 0.6]),
       batch=st.booleans())
def test_same_states_as_sqlite_and_memory(tmp_path_factory, ops, tau, rho, window, wrho, batch):
    """Any sequence of updates, blocks, unblocks and resets gives identical states on all backends."""
    rule = RefusalRule(tau, rho, window=window, window_rho=wrho)
    ns = fresh_namespace("prop")
    tmp = tmp_path_factory.mktemp("prop")
    leds = {k: open_backend(k, rule, ns, tmp) for k in ("memory", "sqlite", "redis")}
    try:
        i = 0
        while i < len(ops):
            op, c, q, f = ops[i]
            f = min(f, q)
            if op == "rec" and batch:  # a record_many of this and the following record ops
                j = i
                ups = []
                while j < len(ops) and ops[j][0] == "rec":
                    ups.append((ops[j][1], ops[j][2], min(ops[j][3], ops[j][2])))
                    j += 1
                got = {k: [core(s) for s in led.record_many(ups)] for k, led in leds.items()}
                i = j
            elif op == "rec":
                got = {k: [core(led.record(c, q, f))] for k, led in leds.items()}
                i += 1
            elif op == "reset":
                for led in leds.values():
                    led.reset(c)
                got = {k: [core(led.get(c))] for k, led in leds.items()}
                i += 1
            else:
                got = {k: [core(led.set_blocked(c, op == "block"))] for k, led in leds.items()}
                i += 1
            assert got["redis"] == got["sqlite"] == got["memory"], (ops, got)
        lists = {k: sorted(core(s) for s in led.clients()) for k, led in leds.items()}
        assert lists["redis"] == lists["sqlite"] == lists["memory"]
    finally:
        for led in leds.values():
            led.close()


def test_namespaces_are_separate_and_unambiguous(redis_uri):
    a = open_ledger(redis_uri, RefusalRule(), "m1")
    b = open_ledger(redis_uri, RefusalRule(), "m1:c:x")  # would collide with client "x:c:..." unencoded
    star = open_ledger(redis_uri, RefusalRule(), "m*")  # a glob character must not widen SCAN
    for led in (a, b, star):
        for s in led.clients():
            led.reset(s.client_id)
    a.record("x:c:y", 3, 1)
    b.record("y", 2, 0)
    star.record("z", 1, 0)
    assert [(s.client_id, s.queries) for s in a.clients()] == [("x:c:y", 3)]
    assert [(s.client_id, s.queries) for s in b.clients()] == [("y", 2)]
    assert [(s.client_id, s.queries) for s in star.clients()] == [("z", 1)]
    assert b.get("x:c:y").queries == 0


def test_prefix_from_uri_separates_stores(redis_uri):
    ns = fresh_namespace()
    plain = open_ledger(redis_uri, RefusalRule(), ns)
    other = open_ledger(redis_uri + "?prefix=otherapp", RefusalRule(), ns)
    plain.record("c", 2, 1)
    assert other.get("c").queries == 0 and other.clients() == []
    assert plain.r.exists(f"guardian:{{{ns}}}:c:c") and other.key("c").startswith("otherapp:")


def test_clients_lists_more_than_one_scan_page(redis_uri):
    led = open_ledger(redis_uri, RefusalRule(), fresh_namespace())
    ids = [f"client-{i:05d}" for i in range(2500)]
    led.record_many([(c, 1, 0) for c in ids])
    got = led.clients()
    assert [s.client_id for s in got] == ids
    assert all(s.queries == 1 for s in got)


def test_retention_ttl_refreshed_and_refused_kept(redis_uri):
    led = open_ledger(redis_uri + "?retention=2s", RefusalRule(tau=2, rho=0.5), fresh_namespace())
    assert led.retention_s == 2
    led.record("idle", 1, 0)
    led.record("bad", 2, 2)  # refused: kept without a TTL
    led.set_blocked("blocked", True)
    assert 0 < led.r.pttl(led.key("idle")) <= 2000
    assert led.r.ttl(led.key("bad")) == -1 and led.r.ttl(led.key("blocked")) == -1
    time.sleep(1.2)
    led.record("idle", 1, 0)  # refreshes the TTL
    assert led.r.pttl(led.key("idle")) > 1500
    time.sleep(2.3)
    assert led.get("idle").queries == 0  # forgotten
    assert led.get("bad").refused and led.get("blocked").blocked
    assert {s.client_id for s in led.clients()} == {"bad", "blocked"}
    led.set_blocked("bad", False)  # unblocked: retention applies again
    assert 0 < led.r.pttl(led.key("bad")) <= 2000


def test_uri_options_and_password_hidden():
    assert parse_duration("90s") == 90 and parse_duration("30m") == 1800
    assert parse_duration("12h") == 43200 and parse_duration("30d") == 30 * 86400 and parse_duration("7") == 7
    with pytest.raises(ConfigError):
        parse_duration("soon")
    led = open_ledger("redis://:s3cret@127.0.0.1:1/2?retention=1h&socket_timeout=0.5", RefusalRule(), "n")
    assert led.retention_s == 3600 and "s3cret" not in led.safe_url
    assert led.r.connection_pool.connection_kwargs["db"] == 2
    assert led.r.connection_pool.connection_kwargs["socket_timeout"] == 0.5


def test_unreachable_store_raises_ledger_unavailable_fast():
    led = open_ledger(f"redis://127.0.0.1:{free_port()}/0", RefusalRule(), "n")
    t0 = time.monotonic()
    with pytest.raises(LedgerUnavailable) as e:
        led.record("c", 1, 0)
    assert callable(e.value.replay)
    for call in (lambda: led.get("c"), led.clients, lambda: led.reset("c"), lambda: led.set_blocked("c", True)):
        with pytest.raises(LedgerUnavailable):
            call()
    assert time.monotonic() - t0 < 3.0


class ReplyDroppingProxy:
    """A loopback TCP proxy to Redis that forwards every request but, while ``drop`` is set, throws
    the server's replies away: the server runs the command, the client never hears back."""

    def __init__(self, port):
        self.target = port
        self.drop = False
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            s = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(c, s, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(s, c, True), daemon=True).start()

    def _pipe(self, src, dst, is_reply):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not (is_reply and self.drop):
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for x in (src, dst):
                try:
                    x.close()
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def test_lost_reply_counts_exactly_once(redis_uri):
    """The server runs the update but the reply is lost (here: dropped by a proxy), so the client times
    out; redis-py resends it (twice) and the resilient layer replays it later: it counts once."""
    port = int(redis_uri.rsplit(":", 1)[1].split("/")[0])
    proxy = ReplyDroppingProxy(port)
    ns = fresh_namespace("lost")
    try:
        led = open_ledger(f"redis://127.0.0.1:{proxy.port}/0?socket_timeout=0.3", RefusalRule(), ns)
        direct = open_ledger(redis_uri, RefusalRule(), ns)
        led.record("c", 1, 0)
        proxy.drop = True
        with pytest.raises(LedgerUnavailable) as e:
            led.record("c", 5, 1)
        # the server ran the script on every attempt (first try + redis-py's retries) but applied it once
        assert (direct.get("c").queries, direct.get("c").flagged) == (6, 1)
        with pytest.raises(LedgerUnavailable):
            e.value.replay()  # still no replies
        proxy.drop = False
        e.value.replay()
        e.value.replay()
        assert (direct.get("c").queries, direct.get("c").flagged) == (6, 1)
        led.record("c", 1, 0)  # the thread's new writer id keeps counting
        assert direct.get("c").queries == 7
    finally:
        proxy.close()


def test_lost_reservation_reply_grants_once_and_is_taken_back(redis_uri):
    """A reservation whose reply is lost counts once, and the error's release takes the grant back from
    the period's count, once; through ResilientLedger (closed mode: the client was answered 503) the
    release runs when the store answers again. Before, the period kept the grant until it ended."""
    from guardian_plugin.ledger.resilient import ResilientLedger

    port = int(redis_uri.rsplit(":", 1)[1].split("/")[0])
    proxy = ReplyDroppingProxy(port)
    ns = fresh_namespace("lostres")
    rule = RefusalRule(quota=10, quota_period_s=3600)
    try:
        led = open_ledger(f"redis://127.0.0.1:{proxy.port}/0?socket_timeout=0.3", rule, ns)
        direct = open_ledger(redis_uri, rule, ns)
        assert led.reserve_many([("c", 4)])[0].granted == 4
        proxy.drop = True
        with pytest.raises(LedgerUnavailable) as e:
            led.reserve_many([("c", 3), ("d", 2)])
        assert direct.get("c").period_queries == 7 and direct.get("d").period_queries == 2  # ran once
        with pytest.raises(LedgerUnavailable):
            e.value.release()  # no reply: kept for later
        proxy.drop = False
        e.value.release()
        assert direct.get("c").period_queries == 4 and direct.get("d").period_queries == 0
        e.value.release()  # again: nothing more is taken back
        assert direct.get("c").period_queries == 4 and direct.get("d").period_queries == 0
        assert led.reserve_many([("c", 9)])[0].granted == 6  # the thread's new writer id reserves as usual

        resilient = ResilientLedger(led, "closed", retry_interval_s=0.05, background=False)
        proxy.drop = True
        with pytest.raises(LedgerUnavailable):
            resilient.reserve_many([("e", 5)])
        assert direct.get("e").period_queries == 5
        proxy.drop = False
        time.sleep(0.06)
        assert resilient.flush() and direct.get("e").period_queries == 0
        assert resilient.reserve_many([("e", 12)])[0].granted == 10
    finally:
        proxy.close()


def _hammer(url, ns, n, flagged):
    led = open_ledger(url, RefusalRule(tau=100, rho=0.5), ns)
    for _ in range(n):
        led.record("one", 1, flagged)


def test_four_processes_exact_counts_and_refusal_point(redis_uri):
    ns = fresh_namespace("conc")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(redis_uri, ns, 500, 1)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    s = open_ledger(redis_uri, RefusalRule(tau=100), ns).get("one")
    assert (s.queries, s.flagged) == (2000, 2000)
    assert s.refused and s.refused_at_query == 100  # exactly at tau, as with one process
