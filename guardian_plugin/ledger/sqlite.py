"""SQLite ledger: the default. One file shared by every worker process on one host.

WAL journal so readers never wait for the writer, a busy timeout so concurrent writers queue instead
of failing, and one ``BEGIN IMMEDIATE`` transaction per update so the read-modify-write of a client's
counts and the refusal decision happen atomically across processes.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
from typing import List

from guardian_plugin.errors import LedgerUnavailable
from guardian_plugin.ledger.base import ClientState, Ledger, RefusalRule, now, window_push

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
# added after the first release; opened files without it are migrated in place
_ADDED_COLUMNS = {"win": "TEXT"}  # sliding-window bits, see base.window_push


def _unavailable(fn):
    """A locked, unreadable or unwritable database file is an unavailable store (the transaction was
    rolled back, so nothing of the failed call was applied)."""

    @functools.wraps(fn)
    def wrapper(self, *a, **kw):
        try:
            return fn(self, *a, **kw)
        except sqlite3.OperationalError as e:
            raise LedgerUnavailable(f"sqlite ledger {self.path}: {e}") from e

    return wrapper


class SQLiteLedger(Ledger):
    scheme = "sqlite"

    def __init__(self, path: str, rule: RefusalRule, namespace: str = "default", timeout_s: float = 30.0):
        super().__init__(rule, namespace)
        self.path = path
        self.timeout_s = timeout_s
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._local = threading.local()
        with self._tx() as con:
            con.execute(_SCHEMA)
            have = {r[1] for r in con.execute("PRAGMA table_info(clients)")}
            for col, typ in _ADDED_COLUMNS.items():
                if col not in have:
                    con.execute(f"ALTER TABLE clients ADD COLUMN {col} {typ}")

    # one connection per thread: sqlite3 connections must not cross threads
    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
            con.execute("PRAGMA synchronous=NORMAL")
            self._local.con = con
        return con

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

    def _row_to_state(self, client_id: str, row) -> ClientState:
        if row is None:
            return ClientState(client_id)
        q, f, r, b, at, fs, ls, win = row
        s = ClientState(client_id, q, f, bool(r), bool(b), at, fs, ls)
        if self.rule.window:
            w = (win or "")[-self.rule.window:]
            s.extra = {"window": len(w), "window_flagged": w.count("1")}
        return s

    _COLS = "queries, flagged, refused, blocked, refused_at_query, first_seen, last_seen, win"

    def _select(self, con, client_id):
        return con.execute(
            f"SELECT {self._COLS} FROM clients WHERE namespace=? AND client_id=?",
            (self.namespace, client_id),
        ).fetchone()

    def _apply(self, con, client_id: str, queries: int, flagged: int) -> ClientState:
        if queries < 0 or flagged < 0 or flagged > queries:
            raise ValueError(f"bad update queries={queries} flagged={flagged}")
        t = now()
        con.execute(
            "INSERT INTO clients(namespace, client_id, queries, flagged, first_seen, last_seen)"
            " VALUES (?,?,?,?,?,?) ON CONFLICT(namespace, client_id) DO UPDATE SET"
            " queries = queries + excluded.queries, flagged = flagged + excluded.flagged,"
            " last_seen = excluded.last_seen",
            (self.namespace, client_id, queries, flagged, t, t),
        )
        row = self._select(con, client_id)
        hit = self.rule.triggered(row[0], row[1])
        if self.rule.window:
            win = window_push(row[7] or "", queries, flagged, self.rule.window)
            con.execute("UPDATE clients SET win=? WHERE namespace=? AND client_id=?", (win, self.namespace, client_id))
            row = row[:7] + (win,)
            hit = hit or self.rule.window_triggered(win)
        s = self._row_to_state(client_id, row)
        if not s.refused and hit:
            s.refused, s.refused_at_query = True, s.queries
            con.execute(
                "UPDATE clients SET refused=1, refused_at_query=? WHERE namespace=? AND client_id=?",
                (s.queries, self.namespace, client_id),
            )
        return s

    @_unavailable
    def record(self, client_id: str, queries: int, flagged: int) -> ClientState:
        with self._tx() as con:
            return self._apply(con, client_id, queries, flagged)

    @_unavailable
    def record_many(self, updates) -> List[ClientState]:
        with self._tx() as con:
            return [self._apply(con, c, q, f) for c, q, f in updates]

    @_unavailable
    def get(self, client_id: str) -> ClientState:
        return self._row_to_state(client_id, self._select(self._con(), client_id))

    @_unavailable
    def clients(self) -> List[ClientState]:
        rows = self._con().execute(
            f"SELECT client_id, {self._COLS} FROM clients WHERE namespace=? ORDER BY client_id",
            (self.namespace,),
        ).fetchall()
        return [self._row_to_state(r[0], r[1:]) for r in rows]

    @_unavailable
    def reset(self, client_id: str) -> None:
        with self._tx() as con:
            con.execute("DELETE FROM clients WHERE namespace=? AND client_id=?", (self.namespace, client_id))

    @_unavailable
    def set_blocked(self, client_id: str, blocked: bool) -> ClientState:
        with self._tx() as con:
            t = now()
            con.execute(
                "INSERT INTO clients(namespace, client_id, first_seen, last_seen) VALUES (?,?,?,?)"
                " ON CONFLICT(namespace, client_id) DO NOTHING",
                (self.namespace, client_id, t, t),
            )
            if blocked:
                con.execute(
                    "UPDATE clients SET blocked=1 WHERE namespace=? AND client_id=?", (self.namespace, client_id)
                )
            else:
                con.execute(
                    "UPDATE clients SET blocked=0, refused=0, refused_at_query=NULL WHERE namespace=? AND client_id=?",
                    (self.namespace, client_id),
                )
            return self._row_to_state(client_id, self._select(con, client_id))

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None
