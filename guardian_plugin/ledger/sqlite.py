"""SQLite ledger: the default. One file shared by every worker process on one host.

WAL journal so readers never wait for the writer, a busy timeout so concurrent writers queue instead
of failing, and one ``BEGIN IMMEDIATE`` transaction per update so the read-modify-write of a client's
counts and the refusal decision happen atomically across processes.

URI: ``sqlite:///abs/path.db`` or ``sqlite://relative/path.db``, option ``?retention=30d`` (default;
``0`` keeps clients forever): clients idle that long are deleted, except refused and blocked ones. The
deletion runs inside a write, at most once per ``PRUNE_INTERVAL_S`` (or per retention, if shorter) and
process, over an index on ``last_seen``.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from typing import List, Tuple
from urllib.parse import parse_qsl

from guardian_plugin.errors import ConfigError
from guardian_plugin.ledger.base import (DEFAULT_RETENTION_S, ClientState, Ledger, RefusalRule, Reservation,
                                         counts_text, dist_push, new_hold_token, now, parse_duration, register_ledger,
                                         stored_state, text_counts, window_push)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    namespace TEXT NOT NULL,
    client_id TEXT NOT NULL,
    queries INTEGER NOT NULL DEFAULT 0,
    flagged INTEGER NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0,
    blocked INTEGER NOT NULL DEFAULT 0,
    refused_at_query INTEGER,
    first_seen REAL,
    last_seen REAL,
    PRIMARY KEY (namespace, client_id)
)
"""
# added after the first release; opened files without them are migrated in place
_ADDED_COLUMNS = {
    "win": "TEXT",  # sliding-window bits, see base.window_push
    "period": "INTEGER",  # quotas: the period of pq and pf (NULL: none yet), see RefusalRule.period
    "pq": "INTEGER NOT NULL DEFAULT 0",  # quotas: queries reserved in that period
    "pf": "INTEGER NOT NULL DEFAULT 0",  # quotas: flagged queries recorded in that period
    "dcur": "TEXT",  # distribution test: the current block's bin counts (base.counts_text), see dist_push
    "dprev": "TEXT",  # distribution test: the last complete block's
}
_INDEX = "CREATE INDEX IF NOT EXISTS clients_last_seen ON clients(namespace, last_seen)"  # for pruning
# quota holds (base.Ledger.reserve_many): one row per (reservation, client) until committed or released
_HOLDS = """
CREATE TABLE IF NOT EXISTS holds (
    namespace TEXT NOT NULL,
    token TEXT NOT NULL,
    client_id TEXT NOT NULL,
    period INTEGER NOT NULL,
    granted INTEGER NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (namespace, token, client_id)
)
"""
_HOLDS_INDEX = "CREATE INDEX IF NOT EXISTS holds_expires ON holds(namespace, expires, client_id)"
PRUNE_INTERVAL_S = 60.0


def parse_sqlite_uri(uri: str) -> Tuple[str, dict]:
    """``sqlite:///abs.db?retention=7d`` -> (``/abs.db``, {"retention": "7d"})."""
    if not uri.startswith("sqlite://"):
        raise ConfigError(f"not a sqlite URI: {uri!r}")
    rest, _, query = uri[len("sqlite://"):].partition("?")
    if rest.startswith("//"):
        rest = rest[1:]  # sqlite:////abs -> /abs (sqlite:///abs is /abs already)
    if not rest:
        raise ConfigError(f"ledger URI {uri!r} names no file")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(options) - {"retention"}
    if unknown:
        raise ConfigError(f"ledger URI {uri!r}: unknown option(s) {', '.join(sorted(unknown))}; known: retention")
    return rest, options


def sqlite_path(uri: str) -> str:
    return parse_sqlite_uri(uri)[0]


@register_ledger
class SQLiteLedger(Ledger):
    schemes = ("sqlite",)

    def __init__(self, path: str, rule: RefusalRule, namespace: str = "default", timeout_s: float = 30.0,
                 retention_s: int = DEFAULT_RETENTION_S, must_exist: bool = False):
        super().__init__(rule, namespace)
        self.path = path
        self.where = f"sqlite ledger {path}"
        self.timeout_s = timeout_s
        self.retention_s = int(retention_s)
        self._prune_every_s = min(PRUNE_INTERVAL_S, self.retention_s)
        self._next_prune = 0.0
        self._local = threading.local()
        if must_exist and path != ":memory:" and not os.path.isfile(path):
            what = "is a directory, not" if os.path.isdir(path) else "there is no"
            raise ConfigError(f"{self.where}: {what} such SQLite file")
        self._call(self._setup, must_exist)

    @classmethod
    def from_uri(cls, uri, rule, namespace, must_exist=False, **kw) -> "SQLiteLedger":
        path, options = parse_sqlite_uri(uri)
        if "retention" in options:
            kw.setdefault("retention_s", parse_duration(options["retention"]))
        return cls(path, rule, namespace, must_exist=must_exist, **kw)

    def _setup(self, must_exist: bool) -> None:
        if not must_exist and self.path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with self._tx() as con:
            if must_exist and not con.execute("PRAGMA table_info(clients)").fetchall():
                raise ConfigError(f"{self.where}: not a guardian ledger (no clients table)")
            con.execute(_SCHEMA)
            have = {r[1] for r in con.execute("PRAGMA table_info(clients)")}
            for col, typ in _ADDED_COLUMNS.items():
                if col not in have:
                    con.execute(f"ALTER TABLE clients ADD COLUMN {col} {typ}")
            con.execute(_INDEX)
            con.execute(_HOLDS)
            con.execute(_HOLDS_INDEX)

    def _unavailable(self, e: Exception) -> bool:
        """A locked, unreadable, unwritable or corrupt file, or one that is not a database (the
        transaction was rolled back, so nothing of the failed call was applied). Not IntegrityError
        and the like: those are bugs."""
        return isinstance(e, (sqlite3.OperationalError, OSError)) or type(e) is sqlite3.DatabaseError

    # one connection per thread: sqlite3 connections must not cross threads
    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
            self._set_wal(con)
            con.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
            con.execute("PRAGMA synchronous=NORMAL")
            self._local.con = con
        return con

    def _set_wal(self, con: sqlite3.Connection) -> None:
        """``PRAGMA journal_mode=WAL``, retried for up to ``timeout_s``: switching the journal mode does
        not wait on the busy handler, so two workers opening a fresh ledger file at once could fail
        with "database is locked" (seen when TorchServe loads two workers together)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                con.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02 + 0.03 * random.random())

    class _Tx:
        def __init__(self, con):
            self.con = con

        def __enter__(self):
            self.con.execute("BEGIN IMMEDIATE")
            return self.con

        def __exit__(self, exc_type, *_):
            self.con.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self):
        return self._Tx(self._con())

    _COLUMNS = ("queries", "flagged", "refused", "blocked", "refused_at_query", "first_seen", "last_seen", "win",
                "period", "pq", "pf", "dcur", "dprev")
    _COLS = ", ".join(_COLUMNS)

    def _row_to_state(self, client_id: str, row) -> ClientState:
        if row is None:
            return ClientState(client_id)
        q, f, r, b, at, fs, ls, win, period, pq, pf, _, dprev = row
        w = (win or "")[-self.rule.window:] if self.rule.window else ""
        return stored_state(client_id, self.rule, q, f, r, b, at, fs, ls, (len(w), w.count("1")),
                            period, pq, pf, dprev)

    def _select(self, con, client_id):
        return con.execute(
            f"SELECT {self._COLS} FROM clients WHERE namespace=? AND client_id=?",
            (self.namespace, client_id),
        ).fetchone()

    def _update(self, con, client_id: str, **values) -> None:
        con.execute(f"UPDATE clients SET {', '.join(k + '=?' for k in values)} WHERE namespace=? AND client_id=?",
                    tuple(values.values()) + (self.namespace, client_id))

    def _prune(self, con) -> None:
        """Forget clients idle longer than the retention, except refused and blocked ones; at most once
        per interval and process, inside the caller's write transaction."""
        t = now()
        if not self.retention_s or t < self._next_prune:
            return
        self._next_prune = t + self._prune_every_s
        con.execute("DELETE FROM clients WHERE namespace=? AND last_seen < ? AND refused=0 AND blocked=0",
                    (self.namespace, t - self.retention_s))

    def _apply(self, con, client_id: str, queries: int, flagged: int, bins=None) -> ClientState:
        t = now()
        con.execute(
            "INSERT INTO clients(namespace, client_id, queries, flagged, first_seen, last_seen)"
            " VALUES (?,?,?,?,?,?) ON CONFLICT(namespace, client_id) DO UPDATE SET"
            " queries = queries + excluded.queries, flagged = flagged + excluded.flagged,"
            " last_seen = excluded.last_seen",
            (self.namespace, client_id, queries, flagged, t, t),
        )
        row = dict(zip(self._COLUMNS, self._select(con, client_id)))
        hit = self.rule.triggered(row["queries"], row["flagged"])
        new = {}
        if self.rule.window:
            new["win"] = window_push(row["win"] or "", queries, flagged, self.rule.window)
            hit = hit or self.rule.window_triggered(new["win"])
        if self.rule.quotas:
            s = self._row_to_state(client_id, tuple(row.values()))
            new["period"], new["pq"], new["pf"] = self._recorded_period(s, flagged, t)
        if self.rule.dist_bins and bins is not None:
            cur, prev = dist_push(text_counts(row["dcur"]), text_counts(row["dprev"]), bins, self.rule.dist_bins,
                                  self.rule.dist_block)
            new["dcur"], new["dprev"] = counts_text(cur), counts_text(prev)
        if not row["refused"] and hit:
            new["refused"], new["refused_at_query"] = 1, row["queries"]
        if new:
            self._update(con, client_id, **new)
            row.update(new)
        return self._row_to_state(client_id, tuple(row.values()))

    def _record_many(self, updates, commit) -> List[ClientState]:
        with self._tx() as con:
            self._prune(con)
            con.executemany("DELETE FROM holds WHERE namespace=? AND token=? AND client_id=?",
                            [(self.namespace, tok, c) for c, tok in commit])  # final: the queries stay counted
            return [self._apply(con, *u) for u in updates]

    def _reserve_many(self, requests) -> List[Reservation]:
        with self._tx() as con:  # one write transaction: no other process reserves in between
            t = now()
            self._sweep(con, t)
            token = new_hold_token()
            out = []
            for c, n in requests:
                r = self._admit(self._row_to_state(c, self._select(con, c)), n, t,
                                lambda period, pq, pf, c=c: self._set_period(con, c, t, period, pq, pf))
                if r.granted:
                    con.execute("INSERT INTO holds VALUES (?,?,?,?,?,?)", (self.namespace, token, c, r.state.period,
                                                                           r.granted, t + self.rule.quota_lease_s))
                    r.hold = token
                out.append(r)
            return out

    _EXPIRED = "FROM holds WHERE namespace=? AND expires<=?"

    def _sweep(self, con, t: float, client_id=None) -> None:
        """Release the holds whose lease has passed (of one client, or of the namespace): their queries
        leave the period count they were added to. Inside the caller's write transaction."""
        where, args = self._EXPIRED, (self.namespace, t)
        if client_id is not None:
            where, args = where + " AND client_id=?", args + (client_id,)
        expired = con.execute(f"SELECT client_id, period, SUM(granted) {where} GROUP BY client_id, period",
                              args).fetchall()
        for c, period, granted in expired:
            con.execute("UPDATE clients SET pq = MAX(0, pq - ?) WHERE namespace=? AND client_id=? AND period=?",
                        (granted, self.namespace, c, period))
        if expired:
            con.execute(f"DELETE {where}", args)

    def _sweep_if_due(self, client_id=None) -> None:
        """A read releases expired holds first (a write transaction only when there are some)."""
        where, args = self._EXPIRED, (self.namespace, now())
        if client_id is not None:
            where, args = where + " AND client_id=?", args + (client_id,)
        if self._con().execute(f"SELECT 1 {where} LIMIT 1", args).fetchone() is not None:
            with self._tx() as con:
                self._sweep(con, now(), client_id)

    def _ensure_row(self, con, client_id: str, t: float) -> None:
        con.execute("INSERT INTO clients(namespace, client_id, first_seen, last_seen) VALUES (?,?,?,?)"
                    " ON CONFLICT(namespace, client_id) DO NOTHING", (self.namespace, client_id, t, t))

    def _set_period(self, con, client_id: str, t: float, period: int, pq: int, pf: int) -> ClientState:
        self._ensure_row(con, client_id, t)
        self._update(con, client_id, period=period, pq=pq, pf=pf)
        return self._row_to_state(client_id, self._select(con, client_id))

    def _get(self, client_id: str) -> ClientState:
        self._sweep_if_due(client_id)
        return self._row_to_state(client_id, self._select(self._con(), client_id))

    def _clients(self) -> List[ClientState]:
        self._sweep_if_due()
        rows = self._con().execute(
            f"SELECT client_id, {self._COLS} FROM clients WHERE namespace=? ORDER BY client_id",
            (self.namespace,),
        ).fetchall()
        return [self._row_to_state(r[0], r[1:]) for r in rows]

    def _reset(self, client_id: str) -> None:
        with self._tx() as con:
            con.execute("DELETE FROM clients WHERE namespace=? AND client_id=?", (self.namespace, client_id))
            con.execute("DELETE FROM holds WHERE namespace=? AND client_id=?", (self.namespace, client_id))

    def _reset_quota(self, client_id: str) -> None:
        with self._tx() as con:
            self._update(con, client_id, period=None, pq=0, pf=0)
            con.execute("DELETE FROM holds WHERE namespace=? AND client_id=?", (self.namespace, client_id))

    def _refuse(self, client_id: str) -> ClientState:
        with self._tx() as con:
            self._ensure_row(con, client_id, now())
            con.execute("UPDATE clients SET refused=1, refused_at_query=queries WHERE namespace=? AND client_id=?"
                        " AND refused=0", (self.namespace, client_id))
            return self._row_to_state(client_id, self._select(con, client_id))

    def _set_blocked(self, client_id: str, blocked: bool) -> ClientState:
        key = (self.namespace, client_id)
        with self._tx() as con:
            if blocked:
                self._ensure_row(con, client_id, now())
                con.execute("UPDATE clients SET blocked=1 WHERE namespace=? AND client_id=?", key)
            else:  # an unknown client stays unknown
                con.execute("UPDATE clients SET blocked=0, refused=0, refused_at_query=NULL"
                            " WHERE namespace=? AND client_id=?", key)
            return self._row_to_state(client_id, self._select(con, client_id))

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None
