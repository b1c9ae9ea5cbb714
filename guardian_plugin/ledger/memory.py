"""In-process ledger: one process only (tests, single-worker deployments, evaluation harness)."""

from __future__ import annotations

import functools
import threading
from dataclasses import replace
from typing import Dict, List

from guardian_plugin.ledger.base import (ClientState, Ledger, RefusalRule, Reservation, dist_push, new_hold_token, now,
                                         register_ledger, window_push)


@register_ledger
class MemoryLedger(Ledger):
    schemes = ("memory",)
    where = "memory ledger"

    def __init__(self, rule: RefusalRule, namespace: str = "default"):
        super().__init__(rule, namespace)
        self._lock = threading.Lock()
        self._states: Dict[str, ClientState] = {}
        self._windows: Dict[str, str] = {}  # sliding-window bits per client (rule.window > 0)
        self._dist_cur: Dict[str, list] = {}  # the distribution test's current block per client
        self._holds: Dict[str, Dict[str, tuple]] = {}  # client -> hold token -> (period, granted, expires)

    def _new(self, client_id: str, t: float) -> ClientState:
        s = self._states.get(client_id)
        if s is None:
            s = self._states[client_id] = ClientState(client_id, first_seen=t, last_seen=t)
        return s

    def _reserve_many(self, requests) -> List[Reservation]:
        with self._lock:
            t = now()
            token = new_hold_token()
            out = []
            for c, n in requests:
                self._sweep(c, t)
                r = self._admit(self._copy_or_new(c), n, t, functools.partial(self._set_period, c, t))
                if r.granted:
                    self._holds.setdefault(c, {})[token] = (r.state.period, r.granted, t + self.rule.quota_lease_s)
                    r.hold = token
                out.append(r)
            return out

    def _sweep(self, client_id: str, t: float) -> None:
        """Release the client's holds whose lease has passed (caller holds the lock)."""
        hs = self._holds.get(client_id)
        if not hs:
            return
        s = self._states.get(client_id)
        for tok, (period, granted, expires) in list(hs.items()):
            if expires <= t:
                del hs[tok]
                if s is not None and s.period == period:
                    s.period_queries = max(0, s.period_queries - granted)
        if not hs:
            del self._holds[client_id]

    def _copy_or_new(self, client_id: str) -> ClientState:
        s = self._states.get(client_id)
        return self._copy(s) if s else ClientState(client_id)

    def _set_period(self, client_id: str, t: float, period: int, pq: int, pf: int) -> ClientState:
        s = self._new(client_id, t)
        s.period, s.period_queries, s.period_flagged = period, pq, pf
        return self._copy(s)

    @staticmethod
    def _copy(s: ClientState) -> ClientState:
        return replace(s, extra=dict(s.extra), dist_counts=list(s.dist_counts) if s.dist_counts else s.dist_counts)

    def _record_many(self, updates, commit) -> List[ClientState]:
        with self._lock:
            for c, tok in commit:  # final: the queries stay counted
                hs = self._holds.get(c)
                if hs is not None:
                    hs.pop(tok, None)
                    if not hs:
                        del self._holds[c]
            return [self._apply(*u) for u in updates]

    def _apply(self, client_id: str, queries: int, flagged: int, bins=None) -> ClientState:
        t = now()
        s = self._new(client_id, t)
        s.queries += queries
        s.flagged += flagged
        s.last_seen = t
        if self.rule.quotas:
            s.period, s.period_queries, s.period_flagged = self._recorded_period(s, flagged, t)
        if self.rule.dist_bins and bins is not None:
            self._dist_cur[client_id], s.dist_counts = dist_push(
                self._dist_cur.get(client_id), s.dist_counts, bins, self.rule.dist_bins, self.rule.dist_block)
        hit = self.rule.triggered(s.queries, s.flagged)
        if self.rule.window:
            w = window_push(self._windows.get(client_id, ""), queries, flagged, self.rule.window)
            self._windows[client_id] = w
            s.extra = {"window": len(w), "window_flagged": w.count("1")}
            hit = hit or self.rule.window_triggered(w)
        if not s.refused and hit:
            s.refused = True
            s.refused_at_query = s.queries
        return self._copy(s)

    def _get(self, client_id: str) -> ClientState:
        with self._lock:
            self._sweep(client_id, now())
            return self._copy_or_new(client_id)

    def _clients(self) -> List[ClientState]:
        with self._lock:
            t = now()
            for c in list(self._holds):
                self._sweep(c, t)
            return [self._copy(s) for _, s in sorted(self._states.items())]

    def _reset(self, client_id: str) -> None:
        with self._lock:
            self._states.pop(client_id, None)
            self._holds.pop(client_id, None)
            self._windows.pop(client_id, None)
            self._dist_cur.pop(client_id, None)

    def _reset_quota(self, client_id: str) -> None:
        with self._lock:
            s = self._states.get(client_id)
            if s is not None:
                s.period, s.period_queries, s.period_flagged = None, 0, 0
            self._holds.pop(client_id, None)

    def _refuse(self, client_id: str) -> ClientState:
        with self._lock:
            s = self._new(client_id, now())
            if not s.refused:
                s.refused, s.refused_at_query = True, s.queries
            return self._copy(s)

    def _set_blocked(self, client_id: str, blocked: bool) -> ClientState:
        with self._lock:
            s = self._states.get(client_id)
            if s is None:
                if not blocked:
                    return ClientState(client_id)
                s = self._states[client_id] = ClientState(client_id, first_seen=now())
            s.blocked = blocked
            if not blocked:
                s.refused = False
                s.refused_at_query = None
            return self._copy(s)
