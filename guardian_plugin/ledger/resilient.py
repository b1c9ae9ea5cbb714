"""What happens when the per-client store fails: a wrapper that gives any ledger the operator's choice.

``ResilientLedger(inner, mode="closed" | "open")`` (``ledger_failure:`` in the guard config):

- ``closed`` (default): while the store is down every call raises :class:`LedgerUnavailable`, which the
  adapters answer with HTTP 503. Nothing is served unchecked.
- ``open``: requests are served. Refusal is decided from what this process knows (the client's last
  state read from the store plus the counts it could not write, under the same rule), every failure is
  logged at ERROR level, and the counts are kept in memory.

In both modes the counts of an update that could not be written are kept and added to the store when it
is back (a background thread retries every ``retry_interval_s``; every call retries too once the
interval has passed), so no count is lost once the store returns. An update whose fate is unknown (the
store died after running it, before answering) is not re-added blindly: the backend's exception carries
a ``replay`` that resends it under the same idempotency token (see guardian_plugin.ledger.redis), so it
counts exactly once. Counts still pending when the process dies are lost: a worker killed while the
store is down loses what only it held.

In closed mode a batch whose update failed is answered 503, yet its queries did reach the model and
were inspected, so they are counted as well once the store returns: the store then holds every query
that passed the refusal check. The quota holds such an update commits are kept with its counts and
committed with them (a replay carries its own); holds whose lease ended meanwhile were released.

Quotas (:meth:`Ledger.reserve_many`): while the store is up reservations go to it. While it is down,
closed mode raises LedgerUnavailable (nothing is granted) and open mode grants every query asked for,
unchecked against the quotas, except to clients it knows are refused or blocked (counted in
``stats["granted_unchecked"]`` and logged at ERROR level); those queries do not count against the
period's quota later. A reservation whose fate is unknown (its reply lost) is taken back when the
store returns, where the backend says how (the ``release`` of Redis's exception): its client was
answered 503, or served unchecked, so it does not count against the quota either. The
distribution-test bin counts of updates held here are summed per client with their queries and flagged
counts and written with them when the store returns (one update per client, so the queries served while
the store was down land in the client's current block together, and a block they complete may hold more
than ``dist_block`` queries); an update held as a replay is resent whole, bins included.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from itertools import zip_longest
from dataclasses import replace
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from guardian_plugin.errors import LedgerUnavailable
from guardian_plugin.ledger.base import ClientState, Ledger, Reservation

log = logging.getLogger("guardian_plugin.ledger")

MODES = ("closed", "open")


class _Replay:
    __slots__ = ("fn", "updates")

    def __init__(self, fn: Callable[[], List[ClientState]], updates: List[tuple]):
        self.fn, self.updates = fn, [tuple(u[:3]) for u in updates]  # (client, queries, flagged) to count


class ResilientLedger(Ledger):
    def __init__(self, inner: Ledger, mode: str = "closed", retry_interval_s: float = 1.0,
                 known_clients: int = 100_000, background: bool = True):
        if mode not in MODES:
            raise ValueError(f"ledger failure mode must be one of {MODES}, got {mode!r}")
        super().__init__(inner.rule, inner.namespace)
        self.inner = inner
        self.mode = mode
        self.where = inner.where
        self.retry_interval_s = float(retry_interval_s)
        self.background = background
        self._lock = threading.RLock()
        self._flush_lock = threading.Lock()
        # counts surely not in the store: client -> [queries, flagged, summed bins or None]
        self._pending: "OrderedDict[str, list]" = OrderedDict()
        self._replays: List[_Replay] = []  # updates that may or may not be in the store
        self._releases: List[Callable[[], object]] = []  # reservations to take back (fate unknown)
        self._commits: List[Tuple[str, str]] = []  # (client, hold token): holds to commit with _pending
        self._known: "OrderedDict[str, ClientState]" = OrderedDict()  # open mode: last state per client
        self._known_cap = known_clients
        self._local_refused: Dict[str, int] = {}  # open mode: refused here while the store was down
        self._down_since: Optional[float] = None
        self._retry_at = 0.0
        self._last_loud = 0.0
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._last_unchecked_grant = 0.0
        self.stats = {"failures": 0, "flushed_updates": 0, "served_unchecked": 0, "granted_unchecked": 0}

    # --------------------------------------------------------------------------- status
    @property
    def down(self) -> bool:
        return self._down_since is not None

    def pending_counts(self) -> Tuple[int, int]:
        """(queries, flagged) held here and not (surely) in the store yet."""
        with self._lock:
            q = sum(v[0] for v in self._pending.values()) + sum(u[1] for r in self._replays for u in r.updates)
            f = sum(v[1] for v in self._pending.values()) + sum(u[2] for r in self._replays for u in r.updates)
            return q, f

    def _has_pending(self) -> bool:
        return bool(self._pending) or bool(self._replays) or bool(self._releases) or bool(self._commits)

    # ------------------------------------------------------------------- failure handling
    def _mark_down(self, err: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            self.stats["failures"] += 1
            self._error = err
            self._retry_at = now + self.retry_interval_s
            first = self._down_since is None
            if first:
                self._down_since = now
        if first or now - self._last_loud >= 10.0:
            self._last_loud = now
            q, _ = self.pending_counts()
            log.error("guardian: LEDGER STORE UNAVAILABLE (%s mode: %s); %d queries held locally until it "
                      "returns: %s", self.mode, "requests answered 503" if self.mode == "closed"
                      else "serving WITHOUT the shared refusal state", q, err)

    def _mark_up(self) -> None:
        if self._down_since is not None:
            with self._lock:
                if self._down_since is None:
                    return
                took = time.monotonic() - self._down_since
                self._down_since = None
                self._error = None
                self._local_refused.clear()
            log.warning("guardian: ledger store back after %.1f s", took)

    def _due(self) -> bool:
        return self._down_since is None or time.monotonic() >= self._retry_at

    def _keep(self, updates: Iterable[tuple], commit: Iterable[Tuple[str, str]] = ()) -> None:
        with self._lock:
            self._merge_pending(updates)
            self._commits.extend(p for p in commit if p not in self._commits)
        self._ensure_flusher()

    def _merge_pending(self, updates: Iterable[tuple]) -> None:
        """Add (client, queries, flagged[, bins]) updates to the held counts (caller holds the lock)."""
        for c, q, f, *bins in updates:
            v = self._pending.setdefault(c, [0, 0, None])
            v[0] += q
            v[1] += f
            if bins and bins[0] is not None:
                v[2] = [a + b for a, b in zip_longest(v[2] or [], bins[0], fillvalue=0)]

    @staticmethod
    def _as_updates(pending: "OrderedDict[str, list]") -> List[tuple]:
        return [(c, q, f) if bins is None else (c, q, f, tuple(bins)) for c, (q, f, bins) in pending.items()]

    def _keep_replay(self, err: LedgerUnavailable, updates: List[tuple]) -> None:
        with self._lock:
            self._replays.append(_Replay(err.replay, list(getattr(err, "updates", updates))))
        self._ensure_flusher()

    def _keep_release(self, err: LedgerUnavailable) -> None:
        if getattr(err, "release", None) is not None:
            with self._lock:
                self._releases.append(err.release)
            self._ensure_flusher()

    def _absorb_failure(self, err: LedgerUnavailable, updates: List[tuple], commit=()) -> None:
        """Keep the counts of a failed update (and the holds it commits): as a replay if its fate is
        unknown (the replay commits them too), else as counts."""
        if getattr(err, "replay", None) is not None:
            self._keep_replay(err, updates)
        else:
            self._keep(updates, commit)

    def flush(self) -> bool:
        """Write everything held here into the store; True when nothing is left. Safe to call anytime."""
        if not self._has_pending():
            return True
        with self._flush_lock:
            with self._lock:
                replays, self._replays = self._replays, []
                pending, self._pending = self._pending, OrderedDict()
                releases, self._releases = self._releases, []
                commits, self._commits = self._commits, []
            done = 0
            try:
                while releases:
                    releases[0]()
                    releases.pop(0)
                    done += 1
                while replays:
                    states = replays[0].fn()
                    self._remember(states)
                    replays.pop(0)
                    done += 1
                if pending or commits:
                    batch = self._as_updates(pending)
                    try:
                        self._remember(self.inner.record_many(batch, commit=commits))
                    except LedgerUnavailable as e:
                        held, pending, commits = commits, OrderedDict(), []  # handed over to the replay or kept
                        self._absorb_failure(e, batch, held)
                        raise
                    done += 1
                    pending, commits = OrderedDict(), []
            except LedgerUnavailable as e:
                with self._lock:
                    self._releases[:0] = releases
                    self._replays[:0] = replays  # a failed replay keeps its token: retry it as it was
                    self._merge_pending(self._as_updates(pending))
                    self._commits[:0] = [p for p in commits if p not in self._commits]
                self.stats["flushed_updates"] += done
                self._mark_down(e)
                return False
            self.stats["flushed_updates"] += done
        if done:
            log.warning("guardian: wrote %d held ledger update(s) into the store", done)
        self._mark_up()
        return not self._has_pending()

    def _ensure_flusher(self) -> None:
        if not self.background or self._stop.is_set():
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._flusher, name="guardian-ledger-flush", daemon=True)
            self._thread.start()

    def _flusher(self) -> None:
        while not self._stop.wait(self.retry_interval_s):
            if not self._has_pending():
                with self._lock:
                    if not self._has_pending():
                        self._thread = None
                        return
            try:
                self.flush()
            except Exception:  # never let the flusher die silently with counts held
                log.exception("guardian: ledger flush failed")

    def _try_store(self) -> Optional[LedgerUnavailable]:
        """Before using the store: None if it may be used now, else the error to fail with."""
        if not self._due() or (self._has_pending() and not self.flush()):
            return LedgerUnavailable(f"ledger store unavailable: {self._error}")
        return None

    # ---------------------------------------------------------------- open mode: local view
    def _remember(self, states: Iterable[ClientState]) -> None:
        if self.mode != "open":
            return
        with self._lock:
            for s in states:
                self._known[s.client_id] = s
                self._known.move_to_end(s.client_id)
            while len(self._known) > self._known_cap:
                self._known.popitem(last=False)

    def _local_state(self, client_id: str) -> ClientState:
        """The store's last known state plus the counts held here, under the same rule."""
        with self._lock:
            base = self._known.get(client_id)
            s = replace(base, extra=dict(base.extra)) if base else ClientState(client_id)
            q, f, _ = self._pending.get(client_id, (0, 0, None))
            for r in self._replays:
                for c, rq, rf in r.updates:
                    if c == client_id:
                        q, f = q + rq, f + rf
            s.queries += q
            s.flagged += f
            if not s.refused and client_id not in self._local_refused and self.rule.triggered(s.queries, s.flagged):
                self._local_refused[client_id] = s.queries
                log.error("guardian: client %r refused locally at query %d while the ledger store is down",
                          client_id, s.queries)
            if client_id in self._local_refused and not s.refused:
                s.refused, s.refused_at_query = True, self._local_refused[client_id]
            s.extra["unconfirmed"] = True
            return s

    # ------------------------------------------------------------------ Ledger operations
    def _attempt(self, call, on_fail=None):
        """``(call(), None)`` when the store may be used and answers; else, after ``on_fail(error)``:
        closed mode raises the error, open mode returns ``(None, error)`` for the caller to answer
        from what it knows."""
        err = self._try_store() if (self._down_since is not None or self._has_pending()) else None
        if err is None:
            try:
                out = call()
            except LedgerUnavailable as e:
                err = e
                if on_fail:
                    on_fail(e)
                self._mark_down(e)
            else:
                self._mark_up()
                return out, None
        elif on_fail:
            on_fail(err)
        if self.mode == "closed":
            raise err
        return None, err

    def _record_many(self, updates: List[tuple], commit: List[Tuple[str, str]]) -> List[ClientState]:
        states, err = self._attempt(lambda: self.inner.record_many(updates, commit),
                                    lambda e: self._absorb_failure(e, updates, commit))
        if err is None:
            self._remember(states)
            return states
        self.stats["served_unchecked"] += sum(u[1] for u in updates)
        return [self._local_state(u[0]) for u in updates]

    def _reserve_many(self, requests: List[Tuple[str, int]]) -> List[Reservation]:
        out, err = self._attempt(lambda: self.inner.reserve_many(requests), self._keep_release)
        if err is None:
            self._remember(r.state for r in out)
            return out
        out = [Reservation(s, 0 if s.denied else n) for s, n in ((self._local_state(c), n) for c, n in requests)]
        granted = sum(r.granted for r in out)
        now = time.monotonic()
        with self._lock:
            self.stats["granted_unchecked"] += granted
            loud = granted > 0 and now - self._last_unchecked_grant >= 10.0
            if loud:
                self._last_unchecked_grant = now
        if loud:
            log.error("guardian: ledger store down (open mode): %d queries granted WITHOUT the quotas "
                      "(%d since start): %s", granted, self.stats["granted_unchecked"], err)
        return out

    def _get(self, client_id: str) -> ClientState:
        s, err = self._attempt(lambda: self.inner.get(client_id))
        if err is None:
            self._remember([s])
            return s
        return self._local_state(client_id)

    def _clients(self) -> List[ClientState]:
        return self.inner.clients()

    def _reset(self, client_id: str) -> None:
        self.inner.reset(client_id)
        with self._lock:
            self._known.pop(client_id, None)
            self._local_refused.pop(client_id, None)

    def _reset_quota(self, client_id: str) -> None:
        self.inner.reset_quota(client_id)
        with self._lock:
            if client_id in self._known:
                self._known[client_id] = replace(self._known[client_id], period=None, period_queries=0,
                                                 period_flagged=0)

    def _refuse(self, client_id: str) -> ClientState:
        s, err = self._attempt(lambda: self.inner.refuse(client_id))
        if err is None:
            self._remember([s])
            return s
        with self._lock:  # open mode, store down: refused here until the store is back
            self._local_refused.setdefault(client_id, self._local_state(client_id).queries)
        return self._local_state(client_id)

    def _set_blocked(self, client_id: str, blocked: bool) -> ClientState:
        s = self.inner.set_blocked(client_id, blocked)
        self._remember([s])
        return s

    def close(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None:
            t.join(timeout=5)
        if self._has_pending():
            self.flush()
        if self._has_pending():
            q, f = self.pending_counts()
            log.error("guardian: closing with %d queries (%d flagged) not written to the ledger store", q, f)
        self.inner.close()
