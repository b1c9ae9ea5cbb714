"""In-process ledger: one process only (tests, single-worker deployments, evaluation harness)."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Dict, List

from guardian_plugin.ledger.base import ClientState, Ledger, RefusalRule, now, register_ledger, window_push


@register_ledger
class MemoryLedger(Ledger):
    schemes = ("memory",)
    where = "memory ledger"

    def __init__(self, rule: RefusalRule, namespace: str = "default"):
        super().__init__(rule, namespace)
        self._lock = threading.Lock()
        self._states: Dict[str, ClientState] = {}
        self._windows: Dict[str, str] = {}  # sliding-window bits per client (rule.window > 0)

    def _record_many(self, updates) -> List[ClientState]:
        with self._lock:
            return [self._apply(*u) for u in updates]

    def _apply(self, client_id: str, queries: int, flagged: int) -> ClientState:
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

    def _get(self, client_id: str) -> ClientState:
        with self._lock:
            s = self._states.get(client_id)
            return replace(s) if s else ClientState(client_id)

    def _clients(self) -> List[ClientState]:
        with self._lock:
            return [replace(s) for _, s in sorted(self._states.items())]

    def _reset(self, client_id: str) -> None:
        with self._lock:
            self._states.pop(client_id, None)
            self._windows.pop(client_id, None)

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
            return replace(s)
