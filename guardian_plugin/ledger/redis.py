"""Redis ledger: per-client state shared by every replica on every host (``redis://host:6379/0``).

Each update runs as one Lua script on the server, so the counts, the sliding window and the refusal
decision change atomically whatever the number of workers and hosts; the rule is exactly
SQLiteLedger's (see guardian_plugin.ledger.base). Layout, one hash per client::

    <prefix>:{<namespace>}:c:<client id>   q, f, r, b, at, fs, ls, w   (counts, refused, blocked,
                                            refused_at_query, first/last seen, window bits)
    <prefix>:{<namespace>}:w:<writer id>   last sequence number applied for one writer (see below)

``prefix`` defaults to ``guardian``; the namespace is percent-encoded, so namespaces never collide and
the braces keep one namespace in one Redis Cluster hash slot.

URI options (query string), besides redis-py's own (``socket_timeout``, ``socket_connect_timeout``…):

- ``retention``: forget a client this long after its last update (``3600``, ``90s``, ``30m``, ``12h``,
  ``30d``; default ``30d``, ``0`` = keep forever); every update refreshes the TTL. Refused and blocked
  clients are kept (no TTL) until an operator resets or unblocks them, so an attacker cannot wait out
  its refusal.
- ``prefix``: the key prefix.

Exactly once: a reply lost in transit (server killed after running the script, a timeout) leaves it
unknown whether an update was applied. Every update therefore carries (writer id, sequence number);
the script applies it only if that writer's last applied number is lower. After such a failure the
thread retires its writer id, and the raised :class:`LedgerUnavailable` carries ``replay``: a callable
that resends the same update under the same (writer, sequence), applied at most once however often it
runs. :class:`guardian_plugin.ledger.resilient.ResilientLedger` keeps these and replays them when the
store is back. Writer keys expire after ``writer_ttl`` seconds (default 7 days) without use.

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
from guardian_plugin.ledger.base import (DEFAULT_RETENTION_S, ClientState, Ledger, RefusalRule, parse_duration,
                                         register_ledger)

DEFAULT_PREFIX = "guardian"
DEFAULT_WRITER_TTL_S = 7 * 24 * 3600
_FIELDS = ("q", "f", "r", "b", "at", "fs", "ls", "w")
# server replies that mean "not now" rather than "wrong command"
_UNAVAILABLE_REPLIES = {"LOADING", "MISCONF", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN", "BUSY"}

# state of one client, as a flat reply: q, f, r, b, at, fs, ls, window length, window flagged
_LUA_STATE = r"""
local function state(k)
  local v = redis.call('HMGET', k, 'q', 'f', 'r', 'b', 'at', 'fs', 'ls', 'w')
  local w = v[8] or ''
  local _, ones = string.gsub(w, '1', '')
  v[8] = #w
  v[9] = ones
  return v
end
"""

# KEYS[1]: writer key; KEYS[2..]: client hashes
# ARGV: seq, writer_ttl, tau, rho, window, window_rho, retention_s, then (queries, flagged) per client
_LUA_RECORD = _LUA_STATE + r"""
local seq = tonumber(ARGV[1])
local tau, rho = tonumber(ARGV[3]), tonumber(ARGV[4])
local win, wrho, ret = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local apply = true
if seq > 0 then
  local last = tonumber(redis.call('GET', KEYS[1]) or '0')
  if seq <= last then
    apply = false
  else
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  end
end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
local out = {}
for i = 2, #KEYS do
  local k = KEYS[i]
  if apply then
    local q = tonumber(ARGV[8 + 2 * (i - 2)])
    local f = tonumber(ARGV[9 + 2 * (i - 2)])
    local qq = redis.call('HINCRBY', k, 'q', q)
    local ff = redis.call('HINCRBY', k, 'f', f)
    redis.call('HSETNX', k, 'fs', now)
    redis.call('HSET', k, 'ls', now)
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

# KEYS[1]: client hash; ARGV: blocked (0/1), retention_s. Unblocking an unknown client creates nothing.
_LUA_BLOCK = _LUA_STATE + r"""
if ARGV[1] ~= '1' and redis.call('EXISTS', KEYS[1]) == 0 then return state(KEYS[1]) end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
local k = KEYS[1]
redis.call('HSETNX', k, 'q', 0)
redis.call('HSETNX', k, 'f', 0)
redis.call('HSETNX', k, 'fs', now)
redis.call('HSETNX', k, 'ls', now)
if ARGV[1] == '1' then
  redis.call('HSET', k, 'b', '1')
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
        self._record = self.r.register_script(_LUA_RECORD)
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
        q, f, r, b, at, fs, ls = (x.decode() if isinstance(x, bytes) else x for x in v[:7])
        if q is None and f is None and b is None:
            return ClientState(client_id)
        s = ClientState(client_id, int(q or 0), int(f or 0), r == "1", b == "1",
                        int(at) if at not in (None, "") else None,
                        float(fs) if fs else None, float(ls) if ls else None)
        if self.rule.window:
            wlen, wones = (int(v[7]), int(v[8])) if len(v) > 8 else (0, 0)
            s.extra = {"window": wlen, "window_flagged": wones}
        return s

    def _hash_state(self, client_id: str, v) -> ClientState:
        """State from an HMGET of _FIELDS (the window as its bits)."""
        w = v[7] or b""
        return self._state(client_id, v[:7] + [len(w), w.count(b"1")])

    def _argv_rule(self):
        r = self.rule
        return [self.writer_ttl_s, r.tau, repr(float(r.rho)), r.window, repr(float(r.window_rho)), self.retention_s]

    def _run_record(self, updates: List[tuple], writer: str, seq: int) -> List[ClientState]:
        keys = [writer] + [self.key(c) for c, _, _ in updates]
        args = [seq] + self._argv_rule()
        for _, q, f in updates:
            args += [q, f]
        out = self._record(keys=keys, args=args)
        return [self._state(c, v) for (c, _, _), v in zip(updates, out)]

    def _replayable(self, updates: List[tuple], writer: str, seq: int) -> List[ClientState]:
        try:
            return self._call(self._run_record, updates, writer, seq)
        except LedgerUnavailable as err:
            # the same (writer, seq): applied at most once however often it is replayed
            err.replay = functools.partial(self._replayable, updates, writer, seq)
            err.updates = list(updates)
            raise

    # ------------------------------------------------------------------ Ledger operations
    def _record_many(self, updates) -> List[ClientState]:
        writer, seq = self._writer()
        try:
            return self._replayable(updates, writer, seq)
        except LedgerUnavailable:
            self._retire_writer()  # never send a newer sequence number under a writer with one in doubt
            raise

    def _get(self, client_id: str) -> ClientState:
        return self._hash_state(client_id, self.r.hmget(self.key(client_id), *_FIELDS))

    def _clients(self) -> List[ClientState]:
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
        self.r.delete(self.key(client_id))

    def _set_blocked(self, client_id: str, blocked: bool) -> ClientState:
        v = self._block(keys=[self.key(client_id)], args=["1" if blocked else "0", self.retention_s])
        return self._state(client_id, v)

    def ping(self) -> bool:
        return bool(self._call(self.r.ping))

    def close(self) -> None:
        self.r.close()
