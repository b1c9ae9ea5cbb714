"""Per-client counters and the refusal rule (paper III-E).

A client is refused from the moment ``queries >= tau`` and ``flagged / queries > rho`` hold after an
update, and stays refused (sticky) until an operator resets or unblocks it. An operator may also block
a client by hand. Backends apply the rule inside the same atomic update that adds the counts, so many
workers (processes, hosts) sharing one store agree on the query at which a client was refused.

:class:`Ledger` is a template: its public methods check their arguments and turn the backend's own
store failures into :class:`~guardian_plugin.errors.LedgerUnavailable`, once for every backend; a
backend implements the protected ``_record_many``, ``_reserve_many``, ``_get``, ``_clients``, ``_reset``,
``_reset_quota`` and ``_set_blocked`` and names its URI schemes in ``schemes`` (registered with
:func:`register_ledger`).
"""

from __future__ import annotations

import functools
import math
import operator
import re
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

from guardian_plugin.errors import ConfigError, LedgerUnavailable
from guardian_plugin.registry import Registry

MAX_WINDOW = 100_000
MAX_DIST_BINS = 64
MAX_CLIENT_ID_LENGTH = 256  # characters; identities longer than this must be hashed before the ledger
DEFAULT_RETENTION_S = 30 * 86400  # SQLite and Redis forget clients idle this long (refused/blocked kept)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class RefusalRule:
    """Refuse once ``queries >= tau`` and ``flagged / queries > rho`` (both inclusive as written).

    Optional sliding window (beyond the paper; ``window=0`` turns it off): also refuse once the client
    has made at least ``window`` queries and more than ``window_rho`` (default: ``rho``) of its last
    ``window`` queries were flagged, so a long run of real queries cannot dilute synthetic ones. Within
    one update of ``(queries, flagged)`` the flagged queries are taken to come first (see
    :func:`window_push`), the reading least likely to refuse.
    """

    tau: int = field(default_factory=lambda: default_tau())
    rho: float = 0.5
    window: int = 0
    window_rho: Optional[float] = None
    # per-client quotas (docs/refusal-rule.md), enforced atomically by :meth:`Ledger.reserve_many`: at
    # most ``quota`` answered queries, and no query once ``flagged_quota`` flagged ones were answered, per
    # fixed period of ``quota_period_s`` seconds (periods start at multiples of it since the epoch); 0 = off
    quota: int = 0
    flagged_quota: int = 0
    quota_period_s: int = 86400
    # a reservation's lease (docs/ledger.md "Holds"): granted queries are held this long; a hold not
    # committed (Ledger.record_many's ``commit``) by then is released, its queries no longer counted
    quota_lease_s: int = 150
    # the per-client distribution test's counts (guardian_plugin.distribution): ``dist_bins`` bin counts
    # per client, kept in blocks of at least ``dist_block`` queries; 0 = off
    dist_bins: int = 0
    dist_block: int = 0

    def __post_init__(self):
        if self.tau < 1:
            raise ValueError(f"tau must be >= 1, got {self.tau}")
        if not 0.0 <= self.rho < 1.0:
            raise ValueError(f"rho must be in [0, 1), got {self.rho}")
        if not 0 <= self.window <= MAX_WINDOW:
            raise ValueError(f"window must be in [0, {MAX_WINDOW}] (0 = off), got {self.window}")
        if self.window_rho is None:
            object.__setattr__(self, "window_rho", self.rho)
        elif not 0.0 <= self.window_rho < 1.0:
            raise ValueError(f"window_rho must be in [0, 1), got {self.window_rho}")
        for name in ("quota", "flagged_quota", "dist_bins", "dist_block"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        if self.quota_period_s < 1:
            raise ValueError(f"quota_period_s must be >= 1, got {self.quota_period_s}")
        if self.quota_lease_s < 1:
            raise ValueError(f"quota_lease_s must be >= 1, got {self.quota_lease_s}")
        if bool(self.dist_bins) != bool(self.dist_block) or self.dist_bins > MAX_DIST_BINS:
            raise ValueError(f"dist_bins (1..{MAX_DIST_BINS}) and dist_block (>= 1) are set together, or both 0")

    @property
    def quotas(self) -> bool:
        return bool(self.quota or self.flagged_quota)

    def period(self, t: float) -> int:
        """The quota period a time falls in."""
        return int(t // self.quota_period_s)

    def retry_after(self, t: float) -> int:
        """Whole seconds from ``t`` to the start of the next quota period (at least 1)."""
        return max(1, math.ceil((self.period(t) + 1) * self.quota_period_s - t))

    def grant(self, requested: int, period_queries: int, period_flagged: int) -> int:
        """How many of ``requested`` queries the quotas allow, given the period's counts so far."""
        if self.flagged_quota and period_flagged >= self.flagged_quota:
            return 0
        if self.quota:
            return max(0, min(requested, self.quota - period_queries))
        return requested

    def triggered(self, queries: int, flagged: int) -> bool:
        return queries >= self.tau and queries > 0 and flagged / queries > self.rho

    def window_triggered(self, bits: str) -> bool:
        """The sliding-window rule on a client's window string (see :func:`window_push`)."""
        return self.window > 0 and len(bits) >= self.window and bits.count("1") / self.window > self.window_rho


def window_push(bits: str, queries: int, flagged: int, size: int) -> str:
    """A client's sliding window after one update: ``'1'`` per flagged query, ``'0'`` per other one,
    oldest first, at most ``size`` long. Within one update the flagged queries come first (so the
    window holds the fewest flagged queries the counts allow). Every backend applies exactly this
    (the Redis backend in Lua)."""
    if size <= 0:
        return ""
    if queries >= size:
        ones = max(0, flagged - (queries - size))
        return "1" * ones + "0" * (size - ones)
    return (bits + "1" * flagged + "0" * (queries - flagged))[-size:]


def false_refusal_probability(tau: int, rho: float, fpr: float, horizon: int = 10_000) -> float:
    """Upper bound on the chance that a benign client is ever refused.

    A benign client's queries are flagged independently with probability ``fpr``; the rule is checked
    after every query from ``tau`` on, so the chance of a false refusal is at most the union bound
    ``sum_{n=tau}^{horizon} P(Binomial(n, fpr) > rho * n)``. The terms shrink geometrically, so a
    finite horizon loses nothing measurable.
    """
    from scipy.stats import binom

    total = 0.0
    for n in range(tau, horizon + 1):
        k = math.floor(rho * n)  # flagged > rho*n  <=>  flagged >= floor(rho*n) + 1
        term = float(binom.sf(k, n, fpr))
        total += term
        if n > tau + 50 and term < 1e-15:
            break
    return min(total, 1.0)


@functools.lru_cache(maxsize=None)
def default_tau(rho: float = 0.5, fpr: float = 0.05, max_false_refusal: float = 1e-6) -> int:
    """Smallest tau whose false-refusal bound (see above) is at most ``max_false_refusal``; with the
    defaults this is also ``RefusalRule()``'s tau and YAML ``tau: auto``'s (14). Computed once per
    process and arguments.

    ``fpr`` is the per-query false-positive rate assumed for benign traffic. The default 5% is five
    times the calibrated 1% target: real images a detector never saw (other cameras, other content)
    are flagged more often than the calibration set, and the bound must hold for them too.
    """
    for tau in range(1, 100_000):
        if false_refusal_probability(tau, rho, fpr) <= max_false_refusal:
            return tau
    raise ValueError("no tau below 100000 meets the bound")


def parse_duration(text) -> int:
    """``3600`` / ``90s`` / ``30m`` / ``12h`` / ``30d`` -> seconds (``0``: forever, where it means a
    retention)."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", str(text))
    if not m:
        raise ConfigError(f"bad duration {text!r}: expected e.g. 3600, 90s, 30m, 12h or 30d")
    return int(m.group(1)) * _UNIT_S[m.group(2) or "s"]


@dataclass
class ClientState:
    client_id: str
    queries: int = 0
    flagged: int = 0
    refused: bool = False
    blocked: bool = False
    refused_at_query: Optional[int] = None
    first_seen: Optional[float] = None
    last_seen: Optional[float] = None
    extra: dict = field(default_factory=dict)
    # quotas (rule.quotas): the period of the counts below, queries reserved and flagged answers in it
    period: Optional[int] = None
    period_queries: int = 0
    period_flagged: int = 0
    # distribution test (rule.dist_bins): the bin counts of the client's last complete block of at least
    # rule.dist_block queries (None before the first block is complete)
    dist_counts: Optional[List[int]] = None

    def period_counts(self, rule: "RefusalRule", t: float) -> Tuple[int, int]:
        """(queries, flagged) of the quota period ``t`` falls in (zeros when the state's is older)."""
        if self.period != rule.period(t):
            return 0, 0
        return self.period_queries, self.period_flagged

    @property
    def flagged_share(self) -> float:
        return self.flagged / self.queries if self.queries else 0.0

    @property
    def denied(self) -> bool:
        return self.refused or self.blocked

    @property
    def known(self) -> bool:
        """Whether the ledger holds the client (an unknown one reads as all zeros)."""
        return self.first_seen is not None or self.queries > 0 or self.blocked

    def to_dict(self) -> dict:
        d = asdict(self)
        d["flagged_share"] = self.flagged_share
        return d


def check_client_id(client_id) -> str:
    if not isinstance(client_id, str) or not client_id:
        raise ValueError(f"client id must be a non-empty string, got {client_id!r}")
    if len(client_id) > MAX_CLIENT_ID_LENGTH:
        raise ValueError(f"client id longer than {MAX_CLIENT_ID_LENGTH} characters: {client_id[:40]!r}...")
    return client_id


def check_update(client_id, queries, flagged, bins=None) -> tuple:
    """One ``(client_id, queries, flagged[, bins])`` update, checked: ints with ``0 <= flagged <=
    queries``; ``bins`` (distribution-test bin counts) non-negative ints. Returns the triple when no
    bins were given, else the 4-tuple with ``bins`` as a tuple."""
    try:
        q, f = operator.index(queries), operator.index(flagged)
    except TypeError:
        raise ValueError(f"bad update queries={queries!r} flagged={flagged!r}: not integers") from None
    if q < 0 or f < 0 or f > q:
        raise ValueError(f"bad update queries={q} flagged={f}")
    if bins is None:
        return check_client_id(client_id), q, f
    try:
        b = tuple(operator.index(v) for v in bins)
    except TypeError:
        raise ValueError(f"bad update bins={bins!r}: not integers") from None
    if any(v < 0 for v in b) or len(b) > MAX_DIST_BINS:
        raise ValueError(f"bad update bins={b}")
    return check_client_id(client_id), q, f, b


def dist_push(current: Sequence[int], previous: Optional[Sequence[int]], bins: Sequence[int], nbins: int,
              block: int) -> Tuple[List[int], Optional[List[int]]]:
    """A client's distribution-test blocks after one update: ``bins`` is added to the current block; a
    current block holding at least ``block`` queries becomes the complete (previous) one and a new,
    empty block starts. Returns (current, previous). Every backend applies exactly this (Redis in Lua)."""
    cur = [int(v) for v in current] if current else [0] * nbins
    cur = (cur + [0] * nbins)[:nbins]
    for i, v in enumerate(list(bins)[:nbins]):
        cur[i] += int(v)
    if sum(cur) >= block:
        return [0] * nbins, cur
    return cur, (list(previous) if previous is not None else None)


def counts_text(counts: Optional[Sequence[int]]) -> Optional[str]:
    """Bin counts as the text SQLite and Redis store them (``"3,0,2"``; None stays None)."""
    return None if counts is None else ",".join(str(int(v)) for v in counts)


def text_counts(text) -> Optional[List[int]]:
    """:func:`counts_text` read back (bytes too; None or empty: None)."""
    if isinstance(text, bytes):
        text = text.decode()
    return [int(v) for v in text.split(",")] if text else None


def _int_or_none(v) -> Optional[int]:
    return int(v) if v not in (None, "", b"") else None


def stored_state(client_id: str, rule: "RefusalRule", q, f, refused, blocked, at, fs, ls, window=(0, 0),
                 period=None, pq=0, pf=0, dist=None) -> ClientState:
    """A ClientState from a store's fields, as numbers or their text (SQLite and Redis): ``refused`` and
    ``blocked`` true when 1 or "1", ``window`` the (length, flagged) of the window bits, ``dist`` the
    complete block as :func:`counts_text`."""
    s = ClientState(client_id, int(q or 0), int(f or 0), str(refused) == "1", str(blocked) == "1",
                    _int_or_none(at), float(fs) if fs else None, float(ls) if ls else None,
                    period=_int_or_none(period), period_queries=int(pq or 0), period_flagged=int(pf or 0),
                    dist_counts=text_counts(dist))
    if rule.window:
        s.extra = {"window": int(window[0]), "window_flagged": int(window[1])}
    return s


@dataclass
class Reservation:
    """:meth:`Ledger.reserve_many`'s answer for one client: its state after the reservation, how many of
    the requested queries it may send now, when a refused part may be retried (seconds), and the token
    of the hold its granted queries are under (None when nothing is held: nothing granted, or no quotas).
    Commit it with ``record_many(..., commit=[(client, hold)])`` once the answers are sent."""

    state: ClientState
    granted: int
    retry_after: Optional[int] = None
    hold: Optional[str] = None


def new_hold_token() -> str:
    """A hold token no other reservation has (memory and SQLite; Redis uses its (writer, seq))."""
    return uuid.uuid4().hex


def check_commit(commit) -> List[Tuple[str, str]]:
    """``record_many``'s ``commit``: (client_id, hold token) pairs, checked and deduplicated, in order."""
    out = []
    for pair in commit or ():
        try:
            if isinstance(pair, (str, bytes)):
                raise TypeError
            c, tok = pair
        except (TypeError, ValueError):
            raise ValueError(f"bad commit {pair!r}: expected (client_id, hold token)") from None
        if not isinstance(tok, str) or not tok or len(tok) > 128:
            raise ValueError(f"bad hold token {tok!r}")
        p = (check_client_id(c), tok)
        if p not in out:
            out.append(p)
    return out


LEDGERS = Registry("ledger scheme")


def register_ledger(cls):
    """Class decorator: register a Ledger under each of its ``schemes``."""
    for scheme in cls.schemes:
        LEDGERS.register(scheme)(cls)
    return cls


class Ledger(ABC):
    """Interchangeable per-client store. ``namespace`` separates protected models sharing a store.

    Public methods check arguments (client ids: non-empty strings of at most MAX_CLIENT_ID_LENGTH
    characters; counts: ints with 0 <= flagged <= queries; ValueError otherwise) and raise
    LedgerUnavailable for store failures; backends implement the protected methods below and say
    which of their exceptions mean "the store is unavailable" (:meth:`_unavailable`).
    """

    schemes: Tuple[str, ...] = ()  # URI schemes, registered by @register_ledger
    where = "ledger"  # names the store in error messages (no password)

    def __init__(self, rule: RefusalRule, namespace: str = "default"):
        self.rule = rule
        self.namespace = namespace

    @classmethod
    def from_uri(cls, uri: str, rule: RefusalRule, namespace: str, must_exist: bool = False, **kw) -> "Ledger":
        """The ledger a URI of one of ``schemes`` names; ``must_exist``: fail rather than create a store
        (operator tools)."""
        return cls(rule, namespace, **kw)

    # ----------------------------------------------------------------- public API (template)
    def record(self, client_id: str, queries: int, flagged: int) -> ClientState:
        """Atomically add counts, apply the rule, and return the state after the update."""
        return self.record_many([(client_id, queries, flagged)])[0]

    def record_many(self, updates: Iterable[tuple], commit: Optional[Iterable[Tuple[str, str]]] = None
                    ) -> List[ClientState]:
        """``updates``: (client_id, queries, flagged) triples, or (client_id, queries, flagged, bins)
        with the distribution test's bin counts of those queries (``rule.dist_bins`` long; ignored
        when the test is off); one state per update, in order, applied atomically where the backend can.
        With quotas, ``flagged`` is also added to the current period's flagged count (the queries were
        counted when reserved).

        ``commit``: (client_id, hold token) pairs of :meth:`reserve_many`'s holds whose answers are being
        sent: in the same atomic step they become final (their queries stay counted in the period; a
        hold already released after its lease is not counted again). The updates may be empty then."""
        updates = [check_update(*u) for u in updates]
        commit = check_commit(commit)
        if not updates and not commit:
            return []
        return self._call(self._record_many, updates, commit)

    def reserve_many(self, requests: Iterable[tuple]) -> List[Reservation]:
        """Admission under the quotas: ``requests`` are (client_id, queries) pairs, one per distinct
        client. Atomically per client (across every worker and host sharing the store): a refused or
        blocked client is granted nothing; otherwise the quotas of the current period grant up to the
        queries asked for (all of them without quotas), and the granted ones are added to the period's
        count at once, so concurrent workers never grant more than the quota together.

        The granted queries are a *hold* (``Reservation.hold``, one token per call) with a lease of
        ``rule.quota_lease_s`` seconds: committed (``record_many(..., commit=...)``) they stay counted,
        also those that were not answered after all (an image that fails to decode gets its 400 in the
        same response); a hold not committed within its lease (the worker died before answering) is
        released: its queries are taken off the period's count at the next reservation or read of the
        client, by any process. Live holds count against the quota. Without quotas this is a read
        (``get``) and writes nothing."""
        reqs = []
        for c, n in requests:
            try:
                n = operator.index(n)
            except TypeError:
                raise ValueError(f"bad reservation queries={n!r}: not an integer") from None
            if n < 0:
                raise ValueError(f"bad reservation queries={n}")
            reqs.append((check_client_id(c), n))
        if not reqs:
            return []
        if not self.rule.quotas:
            out = []
            for c, n in reqs:
                s = self._call(self._get, c)
                out.append(Reservation(s, 0 if s.denied else n))
            return out
        return self._call(self._reserve_many, reqs)

    def get(self, client_id: str) -> ClientState:
        """The client's state (zeros, ``known`` False, for an unknown client)."""
        return self._call(self._get, check_client_id(client_id))

    def is_denied(self, client_id: str) -> bool:
        return self.get(client_id).denied

    def clients(self) -> List[ClientState]:
        """Every known client of this namespace, by client id."""
        return self._call(self._clients)

    def reset(self, client_id: str) -> None:
        """Forget the client's counts and refusal."""
        self._call(self._reset, check_client_id(client_id))

    def reset_quota(self, client_id: str) -> None:
        """Clear the client's quota period counts only (its counts, refusal and block are kept); an
        unknown client stays unknown."""
        self._call(self._reset_quota, check_client_id(client_id))

    def set_blocked(self, client_id: str, blocked: bool) -> ClientState:
        """Block by hand (a never-seen client too), or unblock: that also lifts a rule refusal and keeps
        the counts; unblocking an unknown client changes nothing (no row is created)."""
        return self._call(self._set_blocked, check_client_id(client_id), bool(blocked))

    def refuse(self, client_id: str) -> ClientState:
        """Refuse the client now (sticky, as the rule does) without adding to its counts:
        ``refused_at_query`` is its query count. Guardian.inspect uses it when a client crosses the rule
        inside a request of several images, which is then not answered, so none of it is counted."""
        return self._call(self._refuse, check_client_id(client_id))

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------- shared by the backends that decide in Python
    def _admit(self, s: ClientState, n: int, t: float, write) -> Reservation:
        """One reservation decided from the client's state ``s`` at time ``t``: nothing for a denied
        client, else what the quotas allow; ``write(period, period_queries, period_flagged)`` stores the
        new period counts (only called when something is granted) and returns the state after."""
        if s.denied:
            return Reservation(s, 0)
        pq, pf = s.period_counts(self.rule, t)
        granted = self.rule.grant(n, pq, pf)
        if granted:
            s = write(self.rule.period(t), pq + granted, pf)
        return Reservation(s, granted, self.rule.retry_after(t) if granted < n else None)

    def _recorded_period(self, s: ClientState, flagged: int, t: float) -> Tuple[int, int, int]:
        """(period, period_queries, period_flagged) after an update with ``flagged`` flagged queries."""
        pq, pf = s.period_counts(self.rule, t)
        return self.rule.period(t), pq, pf + flagged

    # ------------------------------------------------------------------ error translation
    def _unavailable(self, e: Exception) -> bool:
        """Whether a backend exception means the store cannot be used now (a backend says which)."""
        return False

    def _call(self, fn, *args):
        """``fn(*args)`` with the backend's store failures raised as LedgerUnavailable."""
        try:
            return fn(*args)
        except LedgerUnavailable:
            raise
        except Exception as e:
            if not self._unavailable(e):
                raise
            raise LedgerUnavailable(f"{self.where}: {type(e).__name__}: {e}") from e

    # ------------------------------------------------------------- what a backend implements
    @abstractmethod
    def _record_many(self, updates: List[Tuple[str, int, int]], commit: List[Tuple[str, str]]) -> List[ClientState]:
        """Checked updates and (client, hold token) pairs to commit, not both empty."""

    @abstractmethod
    def _reserve_many(self, requests: List[Tuple[str, int]]) -> List[Reservation]:
        """Checked, non-empty (client_id, queries) requests; only called when ``rule.quotas``. A client
        the store does not hold yet is created (first_seen) when something is granted. Releases the
        requested clients' expired holds first; the granted queries go under one new hold."""

    @abstractmethod
    def _get(self, client_id: str) -> ClientState: ...

    @abstractmethod
    def _clients(self) -> List[ClientState]: ...

    @abstractmethod
    def _reset(self, client_id: str) -> None: ...

    @abstractmethod
    def _set_blocked(self, client_id: str, blocked: bool) -> ClientState: ...

    @abstractmethod
    def _refuse(self, client_id: str) -> ClientState: ...

    @abstractmethod
    def _reset_quota(self, client_id: str) -> None: ...


def now() -> float:
    return time.time()
