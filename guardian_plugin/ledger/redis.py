"""Redis ledger: per-client state shared by every replica on every host (``redis://host:6379/0``).

Each update runs as one Lua script on the server, so the counts, the sliding window, the quota period
counts, the distribution-test blocks and the refusal decision change atomically whatever the number of
workers and hosts, and so does each :meth:`reserve_many` (one script for all its clients, periods by the
server's clock); the rule is exactly SQLiteLedger's (see guardian_plugin.ledger.base). Layout, one hash per client::

    <prefix>:{<namespace>}:c:<client id>   q, f, r, b, at, fs, ls, w   (counts, refused, blocked,
                                            refused_at_query, first/last seen, window bits)
                                            p, pq, pf   (quotas: the period, the queries reserved
                                            and the flagged ones recorded in it)
                                            dc, dp   (distribution test: the current and the last
                                            complete block's bin counts, "3,0,2")
    <prefix>:{<namespace>}:h:<client id>   quota holds (base.Ledger.reserve_many): hold token ->
                                            "period|granted|expires" (server time), until committed
                                            (record_many's commit) or released after the lease
    <prefix>:{<namespace>}:w:<writer id>   last sequence number applied for one writer (see below)

``prefix`` defaults to ``guardian``; the namespace is percent-encoded, so namespaces never collide and
the braces keep one namespace in one Redis Cluster hash slot.

URI options (query string), besides redis-py's own (``socket_timeout``, ``socket_connect_timeout``…):

- ``retention``: forget a client this long after its last update (``3600``, ``90s``, ``30m``, ``12h``,
  ``30d``; default ``30d``, ``0`` = keep forever); every update and every granted reservation refreshes
  the TTL. Refused and blocked clients are kept (no TTL) until an operator resets or unblocks them, so an
  attacker cannot wait out its refusal. Keep the retention longer than the quota period: a client
  forgotten mid-period starts it again from zero.
- ``prefix``: the key prefix.

Exactly once: a reply lost in transit (server killed after running the script, a timeout) leaves it
unknown whether an update was applied. Every update therefore carries (writer id, sequence number);
the script applies it only if that writer's last applied number is lower. After such a failure the
thread retires its writer id, and the raised :class:`LedgerUnavailable` carries ``replay``: a callable
that resends the same update under the same (writer, sequence), applied at most once however often it
runs. :class:`guardian_plugin.ledger.resilient.ResilientLedger` keeps these and replays them when the
store is back. Writer keys expire after ``writer_ttl`` seconds (default 7 days) without use.

Reservations carry (writer id, sequence number) too: the script leaves a receipt (the writer's last
reservation: its sequence number, period and grants), so a resend of the same reservation (a retry
after a connection error) grants nothing more and answers the recorded grants. One whose reply is lost
raises LedgerUnavailable and grants nothing; the error carries ``release``: a callable that drops the
holds the server may have made and takes their queries back from the period's counts (only while that
period lasts; once, however often it runs), which the resilient wrapper runs when the store is back.
The hold token of a reservation is its ``<writer id>.<seq>``; its lease is kept by the server's clock.

redis-py is imported when a RedisLedger is made, so the package works without it.
"""

from __future__ import annotations

import functools
import itertools
import re
import threading
import uuid
from typing import List, Optional
from urllib.parse import parse_qsl, quote, urlencode, urlparse, urlunparse

from guardian_plugin.errors import ConfigError, LedgerUnavailable
from guardian_plugin.ledger.base import (DEFAULT_RETENTION_S, ClientState, Ledger, RefusalRule, Reservation,
                                         counts_text, parse_duration, register_ledger, stored_state)

DEFAULT_PREFIX = "guardian"
DEFAULT_WRITER_TTL_S = 7 * 24 * 3600
_FIELDS = ("q", "f", "r", "b", "at", "fs", "ls", "w", "p", "pq", "pf", "dp")
# server replies that mean "not now" rather than "wrong command"
_UNAVAILABLE_REPLIES = {"LOADING", "MISCONF", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN", "BUSY"}

# shared by the scripts. state: one client as a flat reply: q, f, r, b, at, fs, ls, window length, window
# flagged, p, pq, pf, dp. clock: the server's time as text (for fs/ls) and whole seconds. ensure: create
# the hash of a client not seen yet. period_counts: (pq, pf) of period `cur` (zeros for another period).
_LUA_COMMON = r"""
local function state(k)
  local v = redis.call('HMGET', k, 'q', 'f', 'r', 'b', 'at', 'fs', 'ls', 'w', 'p', 'pq', 'pf', 'dp')
  local w = v[8] or ''
  local _, ones = string.gsub(w, '1', '')
  v[8] = #w
  table.insert(v, 9, ones)
  return v
end
local function clock()
  local t = redis.call('TIME')
  return t[1] .. '.' .. string.format('%06d', tonumber(t[2])), tonumber(t[1])
end
local function ensure(k, now)
  redis.call('HSETNX', k, 'q', 0)
  redis.call('HSETNX', k, 'f', 0)
  redis.call('HSETNX', k, 'fs', now)
  redis.call('HSETNX', k, 'ls', now)
end
local function period_counts(k, cur)
  local v = redis.call('HMGET', k, 'p', 'pq', 'pf')
  if tonumber(v[1]) ~= cur then return 0, 0 end
  return tonumber(v[2]) or 0, tonumber(v[3]) or 0
end
-- quota holds: hash hk, one field per hold token: "period|granted|expires" (server seconds).
-- unhold: drop hold `tok` of client k; with `back`, its queries leave the period count they were added to
local function unhold(k, hk, tok, back)
  local h = redis.call('HGET', hk, tok)
  if not h then return 0 end
  redis.call('HDEL', hk, tok)
  if back then
    local per, g = string.match(h, '^(%d+)|(%d+)|')
    local v = redis.call('HMGET', k, 'p', 'pq')
    if tonumber(v[1]) == tonumber(per) and tonumber(g) > 0 then
      redis.call('HSET', k, 'pq', math.max(0, (tonumber(v[2]) or 0) - tonumber(g)))
    end
  end
  return 1
end
-- release client k's holds whose lease has passed at server time t
local function sweep(k, hk, t)
  local v = redis.call('HGETALL', hk)
  for j = 1, #v, 2 do
    local exp = tonumber(string.match(v[j + 1], '|([%d%.]+)$'))
    if exp <= t then unhold(k, hk, v[j], true) end
  end
end
"""

# KEYS[1]: writer key; KEYS[2..n+1]: client hashes of the n updates, then the hold hashes of m commits
# ARGV: seq, writer_ttl, tau, rho, window, window_rho, retention_s, quota period_s (0: quotas off),
# dist_bins, dist_block, m, then (queries, flagged, bins) per client (bins: base.counts_text, '-' for
# none), then the m hold tokens to commit
_LUA_RECORD = _LUA_COMMON + r"""
local seq = tonumber(ARGV[1])
local m = tonumber(ARGV[11])
local n = #KEYS - 1 - m
local tau, rho = tonumber(ARGV[3]), tonumber(ARGV[4])
local win, wrho, ret = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local per, nb, blk = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local apply = true
if seq > 0 then
  local last = tonumber(redis.call('GET', KEYS[1]) or '0')
  if seq <= last then
    apply = false
  else
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  end
end
local now, sec = clock()
-- base.dist_push's parsing: the counts of a text, padded or cut to nb
local function ints(text)
  local t, c = {}, {}
  if text then for x in string.gmatch(text, '[^,]+') do t[#t + 1] = tonumber(x) end end
  for j = 1, nb do c[j] = t[j] or 0 end
  return c
end
if apply then
  for j = 1, m do redis.call('HDEL', KEYS[1 + n + j], ARGV[11 + 3 * n + j]) end  -- final: stays counted
end
local out = {}
for i = 2, n + 1 do
  local k = KEYS[i]
  if apply then
    local q = tonumber(ARGV[12 + 3 * (i - 2)])
    local f = tonumber(ARGV[13 + 3 * (i - 2)])
    local bins = ARGV[14 + 3 * (i - 2)]
    local qq = redis.call('HINCRBY', k, 'q', q)
    local ff = redis.call('HINCRBY', k, 'f', f)
    redis.call('HSETNX', k, 'fs', now)
    redis.call('HSET', k, 'ls', now)
    if per > 0 then
      -- quotas: the queries were counted when reserved; a new period starts at (0, flagged)
      local cur = math.floor(sec / per)
      local pq, pf = period_counts(k, cur)
      redis.call('HSET', k, 'p', cur, 'pq', pq, 'pf', pf + f)
    end
    if nb > 0 and bins ~= '-' then
      -- base.dist_push: add to the current block; a full one becomes the complete block
      local c, b, total = ints(redis.call('HGET', k, 'dc')), ints(bins), 0
      for j = 1, nb do
        c[j] = c[j] + b[j]
        total = total + c[j]
      end
      if total >= blk then
        redis.call('HSET', k, 'dp', table.concat(c, ','), 'dc', string.rep('0,', nb - 1) .. '0')
      else
        redis.call('HSET', k, 'dc', table.concat(c, ','))
      end
    end
    local hit = qq >= tau and qq > 0 and ff / qq > rho
    if win > 0 then
      -- base.window_push: flagged queries of one update first, keep the last `win`
      local w = redis.call('HGET', k, 'w') or ''
      if q >= win then
        local ones = math.max(0, f - (q - win))
        w = string.rep('1', ones) .. string.rep('0', win - ones)
      else
        w = w .. string.rep('1', f) .. string.rep('0', q - f)
        if #w > win then w = string.sub(w, -win) end
      end
      redis.call('HSET', k, 'w', w)
      if not hit and #w >= win then
        local _, ones = string.gsub(w, '1', '')
        hit = ones / win > wrho
      end
    end
    local refused = redis.call('HGET', k, 'r') == '1'
    if hit and not refused then
      redis.call('HSET', k, 'r', '1', 'at', qq)
      refused = true
    end
    if ret > 0 then
      if refused or redis.call('HGET', k, 'b') == '1' then
        redis.call('PERSIST', k)
      else
        redis.call('EXPIRE', k, ret)
      end
    end
  end
  out[#out + 1] = state(k)
end
return out
"""

# shared by the reservation scripts: a receipt is "seq|period|g1,g2,..." (the grants per client key)
_LUA_RECEIPT = r"""
local function receipt(text)
  if not text then return nil end
  local seq, per, gs = string.match(text, '^(%d+)|(%d+)|(.*)$')
  local g = {}
  for x in string.gmatch(gs, '[^,]+') do g[#g + 1] = tonumber(x) end
  return tonumber(seq), tonumber(per), g
end
"""

# KEYS[1]: the writer's receipt key; KEYS[2..n+1]: client hashes, KEYS[n+2..2n+1]: their hold hashes.
# ARGV: quota, flagged_quota, period_s, retention_s, seq, writer_ttl, hold token, lease_s, then the
# queries asked per client. Per client: its state, then granted and retry_after (0: none) --
# RefusalRule.grant and .retry_after. Expired holds of the clients are released first; the grants go
# under the hold token. A resend of the receipt's sequence number grants nothing more and answers the
# recorded grants.
_LUA_RESERVE = _LUA_COMMON + _LUA_RECEIPT + r"""
local quota, fquota, per, ret = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local seq = tonumber(ARGV[5])
local tok, lease = ARGV[7], tonumber(ARGV[8])
local nc = (#KEYS - 1) / 2
local now, sec = clock()
local t = tonumber(now)
local cur = math.floor(sec / per)
local rseq, rper, rg = receipt(redis.call('GET', KEYS[1]))
local again = rseq == seq
local grants = {}
local out = {}
for i = 2, nc + 1 do
  local k = KEYS[i]
  local hk = KEYS[i + nc]
  local n = tonumber(ARGV[7 + i])
  local granted, retry = 0, 0
  local d = redis.call('HMGET', k, 'r', 'b')
  local denied = d[1] == '1' or d[2] == '1'
  if again then
    granted = rg[i - 1] or 0
  else
    sweep(k, hk, t)
    if not denied then
      local pq, pf = period_counts(k, cur)
      if fquota > 0 and pf >= fquota then
        granted = 0
      elseif quota > 0 then
        granted = math.max(0, math.min(n, quota - pq))
      else
        granted = n
      end
      if granted > 0 then
        ensure(k, now)
        redis.call('HSET', k, 'p', cur, 'pq', pq + granted, 'pf', pf)
        redis.call('HSET', hk, tok, cur .. '|' .. granted .. '|' .. string.format('%.6f', t + lease))
        if ret > 0 then
          redis.call('EXPIRE', k, ret)
          redis.call('EXPIRE', hk, ret)
        end
      end
    end
  end
  if granted < n and not denied then
    retry = (cur + 1) * per - sec
  end
  grants[#grants + 1] = granted
  local v = state(k)
  v[#v + 1] = granted
  v[#v + 1] = retry
  out[#out + 1] = v
end
if not again then
  redis.call('SET', KEYS[1], ARGV[5] .. '|' .. cur .. '|' .. table.concat(grants, ',') .. ',', 'EX', ARGV[6])
end
return out
"""

# KEYS: as _LUA_RESERVE's; ARGV[1]: its seq, ARGV[2]: its hold token. Releases the reservation's holds
# (what it added to the period counts leaves them while that period lasts), once. Returns 1 if the
# reservation had run, else 0.
_LUA_RELEASE = _LUA_COMMON + _LUA_RECEIPT + r"""
local rseq = receipt(redis.call('GET', KEYS[1]))
if rseq ~= tonumber(ARGV[1]) then return 0 end
local nc = (#KEYS - 1) / 2
for i = 2, nc + 1 do unhold(KEYS[i], KEYS[i + nc], ARGV[2], true) end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS[1]: client hash, KEYS[2]: its hold hash. A read: releases the expired holds, returns the state.
_LUA_READ = _LUA_COMMON + r"""
local now = clock()
sweep(KEYS[1], KEYS[2], tonumber(now))
return state(KEYS[1])
"""

# KEYS[1]: client hash; ARGV: blocked (0/1, or 'r': refused by the rule, counts unchanged), retention_s.
# Unblocking an unknown client creates nothing.
_LUA_BLOCK = _LUA_COMMON + r"""
if ARGV[1] == '0' and redis.call('EXISTS', KEYS[1]) == 0 then return state(KEYS[1]) end
local now = clock()
local k = KEYS[1]
ensure(k, now)
if ARGV[1] == '1' then
  redis.call('HSET', k, 'b', '1')
  redis.call('PERSIST', k)
elseif ARGV[1] == 'r' then
  if redis.call('HGET', k, 'r') ~= '1' then
    redis.call('HSET', k, 'r', '1', 'at', redis.call('HGET', k, 'q') or '0')
  end
  redis.call('PERSIST', k)
else
  redis.call('HSET', k, 'b', '0', 'r', '0')
  redis.call('HDEL', k, 'at')
  if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', k, ARGV[2]) end
end
return state(k)
"""


def _import_redis():
    try:
        import redis
    except ImportError as e:
        raise ConfigError(f"the redis ledger needs redis-py: pip install redis (guardian-plugin[redis]) ({e})") from e
    return redis


def _glob_escape(s: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", s)


@register_ledger
class RedisLedger(Ledger):
    schemes = ("redis", "rediss")  # rediss: TLS

    def __init__(self, uri: str, rule: RefusalRule, namespace: str = "default", *,
                 retention_s: Optional[int] = None, prefix: Optional[str] = None,
                 writer_ttl_s: int = DEFAULT_WRITER_TTL_S, client=None, **redis_kw):
        super().__init__(rule, namespace)
        redis = _import_redis()
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        self._errors = redis.exceptions
        u = urlparse(uri)
        own, passed = {}, []
        for k, v in parse_qsl(u.query, keep_blank_values=True):
            if k in ("retention", "prefix", "writer_ttl"):
                own[k] = v
            else:
                passed.append((k, v))
        self.safe_url = urlunparse(u._replace(netloc=u.netloc.rsplit("@", 1)[-1], query=""))  # no password
        self.where = f"redis ledger {self.safe_url}"
        if not re.fullmatch(r"/?|/\d+", u.path):  # redis-py would read a bad one as db 0
            raise ConfigError(f"ledger {self.safe_url}: the path must be a database number (/0), not {u.path!r}")
        if retention_s is None:
            retention_s = parse_duration(own["retention"]) if "retention" in own else DEFAULT_RETENTION_S
        self.retention_s = int(retention_s)
        self.writer_ttl_s = int(parse_duration(own["writer_ttl"]) if "writer_ttl" in own else writer_ttl_s)
        self.prefix = prefix or own.get("prefix") or DEFAULT_PREFIX
        url = urlunparse(u._replace(query=urlencode(passed)))
        if client is None:
            q = dict(passed)
            redis_kw.setdefault("socket_connect_timeout", None if "socket_connect_timeout" in q else 2.0)
            redis_kw.setdefault("socket_timeout", None if "socket_timeout" in q else 5.0)
            redis_kw = {k: v for k, v in redis_kw.items() if v is not None}
            # few, short retries: a store that is down must fail fast (the resilient wrapper takes over)
            redis_kw.setdefault("retry", Retry(ExponentialBackoff(cap=0.05, base=0.005), 2))
            try:
                client = redis.Redis.from_url(url, **redis_kw)
            except ValueError as e:
                raise ConfigError(f"ledger {self.safe_url}: {e}") from None
        self.r = client
        ns = quote(namespace, safe="")
        self._base = f"{self.prefix}:{{{ns}}}:"
        self._client_prefix = self._base + "c:"
        self._hold_prefix = self._base + "h:"
        self._record = self.r.register_script(_LUA_RECORD)
        self._reserve = self.r.register_script(_LUA_RESERVE)
        self._release = self.r.register_script(_LUA_RELEASE)
        self._read = self.r.register_script(_LUA_READ)
        self._block = self.r.register_script(_LUA_BLOCK)
        self._local = threading.local()

    @classmethod
    def from_uri(cls, uri, rule, namespace, must_exist=False, **kw) -> "RedisLedger":
        return cls(uri, rule, namespace, **kw)  # a Redis database always exists

    def _unavailable(self, e: Exception) -> bool:
        x = self._errors
        if isinstance(e, (x.ConnectionError, x.TimeoutError, x.ReadOnlyError)):
            return True
        if isinstance(e, x.ResponseError):  # "DB index is out of range": the URI's db does not exist
            return str(e).split(" ", 1)[0] in _UNAVAILABLE_REPLIES or "DB index is out of range" in str(e)
        return False

    # ----------------------------------------------------------------------------- keys
    def key(self, client_id: str) -> str:
        return self._client_prefix + client_id

    def hold_key(self, client_id: str) -> str:
        """The client's quota holds (see _LUA_COMMON's unhold)."""
        return self._hold_prefix + client_id

    def _writer(self):
        """This thread's (writer key, next sequence number)."""
        loc = self._local
        if getattr(loc, "writer", None) is None:
            loc.writer = self._base + "w:" + uuid.uuid4().hex
            loc.seq = itertools.count(1)
        return loc.writer, next(loc.seq)

    def _retire_writer(self):
        self._local.writer = None

    # --------------------------------------------------------------------------- states
    def _state(self, client_id: str, v) -> ClientState:
        """State from a script's flat reply (see _LUA_COMMON's state)."""
        v = [x.decode() if isinstance(x, bytes) else x for x in v]
        if v[0] is None and v[1] is None and v[3] is None:
            return ClientState(client_id)
        return stored_state(client_id, self.rule, *v[:7], (v[7], v[8]), *v[9:13])

    def _hash_state(self, client_id: str, v) -> ClientState:
        """State from an HMGET of _FIELDS (the window as its bits)."""
        w = v[7] or b""
        return self._state(client_id, v[:7] + [len(w), w.count(b"1")] + v[8:])

    def _argv_rule(self):
        r = self.rule
        return [self.writer_ttl_s, r.tau, repr(float(r.rho)), r.window, repr(float(r.window_rho)), self.retention_s,
                r.quota_period_s if r.quotas else 0, r.dist_bins, r.dist_block]

    def _run_record(self, updates: List[tuple], writer: str, seq: int, commit=()) -> List[ClientState]:
        keys = [writer] + [self.key(u[0]) for u in updates] + [self.hold_key(c) for c, _ in commit]
        args = [seq] + self._argv_rule() + [len(commit)]
        for _, q, f, *bins in updates:
            args += [q, f, counts_text(bins[0]) if bins else "-"]
        out = self._record(keys=keys, args=args + [tok for _, tok in commit])
        return [self._state(u[0], v) for u, v in zip(updates, out)]

    def _replayable(self, updates: List[tuple], writer: str, seq: int, commit=()) -> List[ClientState]:
        try:
            return self._call(self._run_record, updates, writer, seq, commit)
        except LedgerUnavailable as err:
            # the same (writer, seq): applied at most once however often it is replayed (commits included)
            err.replay = functools.partial(self._replayable, updates, writer, seq, commit)
            err.updates = list(updates)
            raise

    # ------------------------------------------------------------------ Ledger operations
    def _record_many(self, updates, commit) -> List[ClientState]:
        writer, seq = self._writer()
        try:
            return self._replayable(updates, writer, seq, commit)
        except LedgerUnavailable:
            self._retire_writer()  # never send a newer sequence number under a writer with one in doubt
            raise

    def _reserve_many(self, requests) -> List[Reservation]:
        r = self.rule
        writer, seq = self._writer()
        token = f"{writer.rsplit(':', 1)[-1]}.{seq}"  # the hold: this reservation's (writer, seq)
        keys = [writer + ":r"] + [self.key(c) for c, _ in requests] + [self.hold_key(c) for c, _ in requests]
        args = [r.quota, r.flagged_quota, r.quota_period_s, self.retention_s, seq, self.writer_ttl_s, token,
                r.quota_lease_s]
        try:
            out = self._call(self._reserve, keys, args + [n for _, n in requests])
        except LedgerUnavailable as err:
            self._retire_writer()  # never send a newer sequence number under a writer with one in doubt
            err.release = functools.partial(self._call, self._release, keys, [seq, token])
            raise
        return [Reservation(self._state(c, v), int(v[13]), int(v[14]) or None, token if int(v[13]) else None)
                for (c, _), v in zip(requests, out)]

    def _get(self, client_id: str) -> ClientState:
        return self._state(client_id, self._read(keys=[self.key(client_id), self.hold_key(client_id)]))

    def _sweep_all(self) -> None:
        """Release every expired hold of the namespace (a read of all clients does this first)."""
        prefix = self._hold_prefix
        for hk in set(self.r.scan_iter(match=_glob_escape(prefix) + "*", count=1000)):
            c = hk.decode("utf-8", "surrogateescape")[len(prefix):]
            self._read(keys=[self.key(c), hk])

    def _clients(self) -> List[ClientState]:
        self._sweep_all()
        pattern = _glob_escape(self._client_prefix) + "*"
        keys = sorted(set(self.r.scan_iter(match=pattern, count=1000)))
        out = []
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            pipe = self.r.pipeline(transaction=False)
            for k in chunk:
                pipe.hmget(k, *_FIELDS)
            for k, v in zip(chunk, pipe.execute()):
                s = self._hash_state(k.decode("utf-8", "surrogateescape")[len(self._client_prefix):], v)
                if s.known:  # else it expired between SCAN and HMGET
                    out.append(s)
        return sorted(out, key=lambda s: s.client_id)

    def _reset(self, client_id: str) -> None:
        self.r.delete(self.key(client_id), self.hold_key(client_id))

    def _reset_quota(self, client_id: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(self.key(client_id), "p", "pq", "pf")
        pipe.delete(self.hold_key(client_id))
        pipe.execute()

    def _refuse(self, client_id: str) -> ClientState:
        return self._state(client_id, self._block(keys=[self.key(client_id)], args=["r", self.retention_s]))

    def _set_blocked(self, client_id: str, blocked: bool) -> ClientState:
        v = self._block(keys=[self.key(client_id)], args=["1" if blocked else "0", self.retention_s])
        return self._state(client_id, v)

    def ping(self) -> bool:
        return bool(self._call(self.r.ping))

    def close(self) -> None:
        self.r.close()
