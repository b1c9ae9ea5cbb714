"""In-process ledger: one process only (tests, single-worker deployments, evaluation harness)."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Dict, List

from guardian_plugin.ledger.base import ClientState, Ledger, RefusalRule, now, window_push


class MemoryLedger(Ledger):
    scheme = "memory"

    def __init__(self, rule: RefusalRule, namespace: str = "default"):
        super().__init__(rule, namespace)
        self._lock = threading.Lock()
        self._states: Dict[str, ClientState] = {}
        self._windows: Dict[str, str] = {}  # sliding-window bits per client (rule.window > 0)

    def record(self, client_id: str, queries: int, flagged: int) -> ClientState:
        if queries < 0 or flagged < 0 or flagged > queries:
            raise ValueError(f"bad update queries={queries} flagged={flagged}")
        with self._lock:
            s = self._states.get(client_id)
            t = now()
            if s is None:
                s = ClientState(client_id, first_seen=t)
                self._states[client_id] = s
            s.queries += queries
            s.flagged += flagged
            s.last_seen = t
            hit = self.rule.triggered(s.queries, s.flagged)
            if self.rule.window:
                w = window_push(self._windows.get(client_id, ""), queries, flagged, self.rule.window)
                self._windows[client_id] = w
                s.extra = {"window": len(w), "window_flagged": w.count("1")}
                hit = hit or self.rule.window_triggered(w)
            if not s.refused and hit:
                s.refused = True
                s.refused_at_query = s.queries
            return replace(s, extra=dict(s.extra))

    def get(self, client_id: str) -> ClientState:
        with self._lock:
            s = self._states.get(client_id)
            return replace(s) if s else ClientState(client_id)

    def clients(self) -> List[ClientState]:
        with self._lock:
            return [replace(s) for s in self._states.values()]

    def reset(self, client_id: str) -> None:
        with self._lock:
            self._states.pop(client_id, None)
            self._windows.pop(client_id, None)

    def set_blocked(self, client_id: str, blocked: bool) -> ClientState:
        with self._lock:
            s = self._states.setdefault(client_id, ClientState(client_id, first_seen=now()))
            s.blocked = blocked
            if not blocked:
                s.refused = False
                s.refused_at_query = None
            return replace(s)
