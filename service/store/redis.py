"""Redis store: shared by many replicas.

A session is one hash, `recur:{tenant}:s:{id}`, expiring with its idle TTL. Beside it a small
key `recur:{tenant}:t:{id}` holds the session's expiry time and outlives it by
`tombstone_seconds`, so an expired id is answered "expired at ..." rather than "does not exist".

Every write is one Lua script, atomic in Redis: a put applies only if the stored offset and write
id (`wid`, random per write) are the ones the write started from (compare-and-set), so two
replicas can never both advance one session, and a session deleted and created again, or moved to
another version, is never written from its old state. Scripts run by EVALSHA (pipelined ones too,
without redis-py's SCRIPT EXISTS round trip per pipeline); a NOSCRIPT answer loads them once.

Each replica keeps the records it wrote or read last as hints (bounded by count and bytes), as rows
of a session table with each one's write id beside it, so the chunk pipeline's row round reads and
writes them in place: a chunk reads its session from the hint, and the script stays the judge. A hint another replica
made stale fails the compare-and-set, or disagrees with the client's offset; either way the core
reads the session again (`fresh`) and decides on what is stored, so a stale hint costs one read.
A reply is sent after Redis acknowledged the write; how durable that is, is Redis's
persistence setting (the compose file runs it with appendonly yes, appendfsync everysec).

Where Redis is: `redis://` (one), `redis+sentinel://` (the primary the sentinels name, followed
across failovers by redis-py's Sentinel pool) or `redis+cluster://` (service.store.redis_cluster,
which keeps the same scripts under hash-tagged keys). See service.store.redis_url.

Acknowledged means replicated, when asked: with `min_replicas` N > 0 every write is followed, on
the same connection, by `WAIT N timeout`; fewer acks answer UNAVAILABLE (the write may stand on the
primary: the client's retry finds it and is answered as a replay). A record read from Redis rather
than a hint is confirmed the same way (a no-op write on its key, then WAIT), so a replay never
answers with a chunk only the primary holds.

Session limits: two sorted sets map sessions to their expiry time (Redis's own clock, the one
its key expiry uses), one per tenant (`recur-live:{tenant}`) and one for all (`recur-live`,
members `{tenant}\\0{id}`). The create, put and delete scripts keep them; Redis expiry runs no
script, so the create script first trims what has expired (ZREMRANGEBYSCORE) and then counts
(ZCARD), all in the one atomic step that stores the session. Nothing ever SCANs. Sessions written
before these sets existed are counted from their next write.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from dataclasses import fields
from typing import Any, cast

import numpy as np
from redis.commands.core import AsyncScript as Script
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from service.errors import AlreadyExists, RecurError, SessionExpired, SessionNotFound, StoreConflict, Unavailable
from service.store.base import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_CAPACITY,
    DEFAULT_TOMBSTONE_SECONDS,
    Clock,
    SessionRecord,
    SessionSummary,
    Store,
    fmt_time,
    redact_url,
    server_limit,
    settled,
    tenant_limit,
)
from service.store.record import (
    HASH_ORDER,
    from_hash,
    hash_field,
    hash_value,
    mp_array,
    mp_str,
    pack_arrays,
    pack_rows,
    packed_hash,
    packed_values,
    to_hash,
)
from service.store.redis_url import RedisUrl, connect, parse
from service.store.table import Loc, RowCache, RowWrite

log = logging.getLogger(__name__)

# What "Redis did not answer" looks like: a cluster client's own failures (no node reachable, a slot no
# node serves) are not RedisErrors.
REDIS_ERRORS = (RedisError, RedisClusterException)
CARRIED = 4096  # sessions whose last write's id this store remembers for a chain of writes (_token)
PUT_SESSIONS = 64  # sessions one put script writes (a round's writes are one script per 64, pipelined)
MAX_IN_FLIGHT = 64  # Redis operations one store runs at once (per node's pool on a cluster: below its 100)

# Redis's time in milliseconds; a script sees one frozen time, the one its PEXPIREs count from.
_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""
# KEYS: session, tombstone, tenant set, global set
# ARGV: ttl_ms, tombstone_ms, expires, max_sessions, max_tenant_sessions, id, member, then field/value pairs
_CREATE = _NOW + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local max_tenant = tonumber(ARGV[5])
if max_tenant > 0 and redis.call('ZCARD', KEYS[3]) >= max_tenant then return -2 end
local max_all = tonumber(ARGV[4])
if max_all > 0 and redis.call('ZCARD', KEYS[4]) >= max_all then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 8))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[1]), ARGV[6])
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[1]), ARGV[7])
return 1
"""
# KEYS: _CREATE's four for each session in turn; ARGV[1]: one MessagePack array with an entry per session,
# [ttl_ms, tombstone_ms, prev_offset, expires, id, member, prev_wid, its field/value pairs (an array)]
# (RedisStore._put_entry). Each session's compare-and-set and write as a put of one would do them; one
# answer per session: -2 applied, -1 no such session, -3 written since it was read, else its offset.
_PUT = _NOW + """
local out = {}
for i, a in ipairs(cmsgpack.unpack(ARGV[1])) do
  local k = 4 * (i - 1)
  local cur = redis.call('HMGET', KEYS[k + 1], 'offset', 'wid')
  if not cur[1] then
    out[i] = -1
  elseif tonumber(cur[1]) ~= tonumber(a[3]) then
    out[i] = tonumber(cur[1])
  elseif a[7] ~= '' and (cur[2] or '') ~= a[7] then
    out[i] = -3
  else
    redis.call('HSET', KEYS[k + 1], unpack(a[8]))
    redis.call('PEXPIRE', KEYS[k + 1], a[1])
    redis.call('SET', KEYS[k + 2], a[4], 'PX', a[2])
    redis.call('ZADD', KEYS[k + 3], now + tonumber(a[1]), a[5])
    redis.call('ZADD', KEYS[k + 4], now + tonumber(a[1]), a[6])
    out[i] = -2
  end
end
return out
"""
# KEYS: as _CREATE; ARGV: id, member
_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[2])
return 1
"""
# KEYS: a set; live members only (what expired is still there until a create trims it)
_COUNT = _NOW + """
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""
# ListSessions' fields from a hash (model first: a missing one means the hash has expired); the id is the
# key's, and the expiry updated + ttl
_SUMMARY = ["model", *(f.name for f in fields(SessionSummary) if f.name not in ("session_id", "model", "expires_at")),
            "ttl"]
_SUMMARY_FIELDS = [hash_field(name) for name in _SUMMARY]
_GLOBAL = "recur-live"  # not under "recur:", so no tenant or id can name it
# What a row write puts in a session's hash (RedisStore._row_entries), in the hash's order; a field added to
# SessionRecord fails this at import until the row write writes it too.
_ROW_HASH = ("model", "version", "offset", "created_at", "updated_at", "ttl", "state", "last_digest", "last_start",
             "last_logits", "last_prev_state", "last_request", "token")
assert HASH_ORDER == _ROW_HASH, f"the row write's hash fields are not the hash's: {HASH_ORDER}"
# KEYS: session hashes. A no-op write (the key's expiry set to itself) that moves this connection's
# replication offset past every earlier write of those keys, so that a WAIT after it covers them.
_TOUCH = """
for _, key in ipairs(KEYS) do
  local ttl = redis.call('PTTL', key)
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
end
return 0
"""


class RedisStore(Store):
    hints = True

    def __new__(cls, url: str, **kwargs: Any) -> RedisStore:
        if cls is RedisStore and url.startswith("redis+cluster://"):  # one constructor for every Redis URL
            from service.store.redis_cluster import ClusterStore

            cls = ClusterStore
        return super().__new__(cls)

    def __init__(self, url: str, *, tombstone_seconds: float = DEFAULT_TOMBSTONE_SECONDS, timeout: float = 2.0,
                 clock: Clock = time.time, cache_size: int = DEFAULT_CAPACITY,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, min_replicas: int = 0, wait_timeout: float = 1.0) -> None:
        self.url, self.clock = url, clock
        self.tombstone_seconds = tombstone_seconds
        if min_replicas < 0 or (min_replicas and wait_timeout <= 0):
            raise ValueError("--redis-min-replicas must be >= 0, and --redis-wait-timeout > 0 with it")
        self.min_replicas, self.wait_timeout = min_replicas, wait_timeout
        # a WAIT may take its whole timeout: the socket must outlast it
        self.timeout = max(timeout, wait_timeout + 1.0) if min_replicas else timeout
        self.parsed: RedisUrl = parse(url)
        self._r = connect(self.parsed, self.timeout)
        self._touch = self._r.register_script(_TOUCH)
        # Redis operations in flight at once: redis-py's pools refuse (MaxConnectionsError) rather than
        # wait beyond their 100 connections; past this bound a chunk waits for its turn instead.
        self._permits = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._create = self._r.register_script(_CREATE)
        self._put = self._r.register_script(_PUT)
        self._delete = self._r.register_script(_DELETE)
        self._count = self._r.register_script(_COUNT)
        # hints: the sessions as this replica last wrote or read them, as rows of a session table (the chunk
        # pipeline's row round reads and writes them in place), least recent first; beside each its write id
        self._hints = RowCache()
        self._tokens: dict[tuple[str, str], bytes] = {}
        self.cache_size, self.cache_bytes = cache_size, cache_bytes
        # this store's last writes: (tenant, id) -> (the token the record carried, its offset, the write's id);
        # least recent first, at most CARRIED (a chain of writes needs only its last one)
        self._carried: OrderedDict[tuple[str, str], tuple[bytes, int, bytes]] = OrderedDict()
        self.hint_hits = 0  # reads answered from a hint (tests, benchmarks)

    # -- hints ---------------------------------------------------------------------------------
    def _hint(self, key: tuple[str, str]) -> SessionRecord | None:
        loc = self._hints.loc(key)
        if loc is None:
            return None
        if loc[0].expires(loc[1]) <= self.clock():
            self._forget(key)
            return None
        self.hint_hits += 1
        return loc[0].record(loc[1], self._tokens[key])

    def _remember(self, rec: SessionRecord) -> None:
        key = (rec.tenant, rec.session_id)
        self._carried.pop(key, None)
        if not self.cache_size or rec.nbytes > self.cache_bytes:
            self._forget(key)
            return
        self._hints.put(rec)  # in its row when it has one
        self._tokens[key] = rec.token
        self._bound()

    def _bound(self) -> None:
        while len(self._hints) > self.cache_size or self._hints.nbytes > self.cache_bytes:
            del self._tokens[self._hints.pop_oldest()]

    def _forget(self, key: tuple[str, str]) -> None:
        self._hints.pop(key)
        self._tokens.pop(key, None)
        self._carried.pop(key, None)

    def _token(self, record: SessionRecord, prev_offset: int) -> bytes:
        """The write id to compare: the record's own, unless the record was advanced from this store's
        last write of the session (Generate chains its writes without reading again) - then that
        write's id, which the record could not carry."""
        last = self._carried.get((record.tenant, record.session_id))
        if last is not None and last[0] == record.token and last[1] == prev_offset:
            return last[2]
        return record.token

    async def _evalsha(self, script: Script, keys: list, args: list) -> Any:
        """One EVALSHA; on NOSCRIPT (a restarted or flushed Redis) the script is loaded and run again."""
        async with self._permits:
            try:
                return await self._r.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                await self._r.script_load(script.script)
                return await self._r.evalsha(script.sha, len(keys), *keys, *args)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_url(self.url)!r})"

    # -- acknowledged means replicated -----------------------------------------------------------
    def _unreplicated(self, acked: object) -> Unavailable | None:
        """None when a WAIT's answer reaches --redis-min-replicas, else the error the client gets."""
        if int(acked) >= self.min_replicas:  # type: ignore[call-overload]
            return None
        log.warning("redis: a write reached %s of %d replica(s) within %g s", acked, self.min_replicas,
                    self.wait_timeout)
        return Unavailable(f"the session store did not confirm the write on {self.min_replicas} replica(s) within "
                           f"{self.wait_timeout:g} s (--redis-min-replicas); retry: a chunk that was applied is "
                           "answered as a replay")

    async def _write(self, script: Script, keys: list, args: list, applied: object) -> Any:
        """One write script; with min_replicas, followed by WAIT on the same connection (one pipeline).
        Raises Unavailable when the script answered `applied` but too few replicas confirmed it."""
        if not self.min_replicas:
            return await self._evalsha(script, keys, args)
        for attempt in range(2):
            async with self._permits, self._r.pipeline(transaction=False) as pipe:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                pipe.execute_command("WAIT", self.min_replicas, max(1, int(self.wait_timeout * 1000)))
                res, acked = await pipe.execute(raise_on_error=False)
            if isinstance(res, NoScriptError) and not attempt:
                async with self._permits:
                    await self._r.script_load(script.script)
                continue
            if isinstance(res, Exception):
                raise res
            if isinstance(acked, Exception):
                raise acked
            error = self._unreplicated(acked) if res == applied else None
            if error is not None:
                raise error
            return res
        raise AssertionError("unreachable")

    async def _confirm(self, keys: list) -> None:
        """With min_replicas: return once what `keys` hold now is on that many replicas (a no-op write
        on them, then WAIT), else raise Unavailable. Reads that do not come from a hint call it."""
        if not self.min_replicas or not keys:
            return
        try:
            async with self._permits, self._r.pipeline(transaction=False) as pipe:
                pipe.eval(_TOUCH, len(keys), *keys)
                pipe.execute_command("WAIT", self.min_replicas, max(1, int(self.wait_timeout * 1000)))
                _, acked = await pipe.execute()
        except REDIS_ERRORS as e:
            raise self._down(e) from e
        error = self._unreplicated(acked)
        if error is not None:
            raise error

    @staticmethod
    def _keys(tenant: str, session_id: str) -> list[str]:
        return [f"recur:{tenant}:s:{session_id}", f"recur:{tenant}:t:{session_id}", f"{_GLOBAL}:{tenant}", _GLOBAL]

    @staticmethod
    def _member(tenant: str, session_id: str) -> str:
        return f"{tenant}\0{session_id}"

    def _down(self, e: Exception) -> Unavailable:
        # Neither the message nor the log line holds the URL's password: redact_url is the one formatter.
        log.warning("redis %s: %s: %s", redact_url(self.url), e.__class__.__name__, e)
        return Unavailable(f"the redis session store is unreachable ({e.__class__.__name__}); "
                           "nothing was applied, retry shortly")

    def _ms(self, ttl: float) -> tuple[int, int]:
        """A session's TTL and its tombstone's, in milliseconds."""
        ttl_ms = max(1, int(ttl * 1000))
        return ttl_ms, ttl_ms + int(self.tombstone_seconds * 1000)

    async def get(self, tenant: str, session_id: str) -> SessionRecord:
        hint = self._hint((tenant, session_id))
        return hint if hint is not None else await self.fresh(tenant, session_id)

    async def fresh(self, tenant: str, session_id: str) -> SessionRecord:
        self._forget((tenant, session_id))
        try:
            async with self._permits:
                h = cast(dict[bytes, bytes], await self._r.hgetall(self._keys(tenant, session_id)[0]))
        except REDIS_ERRORS as e:
            raise self._down(e) from e
        rec = await self._record(tenant, session_id, h)
        await self._confirm([self._keys(tenant, session_id)[0]])
        self._remember(rec)
        return rec

    async def get_many(self, tenant: str, session_ids: list[str]) -> list[SessionRecord | Exception]:
        """Hints where this replica has them; the rest in one pipelined round trip."""
        results: list[SessionRecord | Exception | None] = [self._hint((tenant, sid)) for sid in session_ids]
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            try:
                async with self._permits, self._r.pipeline(transaction=False) as pipe:
                    for i in missing:
                        pipe.hgetall(self._keys(tenant, session_ids[i])[0])
                    hashes = await pipe.execute()
            except REDIS_ERRORS as e:
                return [self._down(e)] * len(session_ids)
            found: list[int] = []
            for i, h in zip(missing, hashes):
                try:
                    results[i] = await self._record(tenant, session_ids[i], h)
                    found.append(i)
                except RecurError as e:
                    results[i] = e
            try:
                await self._confirm([self._keys(tenant, session_ids[i])[0] for i in found])
            except Unavailable as e:
                return [e] * len(session_ids)
            for i in found:
                self._remember(cast(SessionRecord, results[i]))
        return cast(list[SessionRecord | Exception], results)

    async def _record(self, tenant: str, session_id: str, h: dict[bytes, bytes]) -> SessionRecord:
        if not h:
            try:
                async with self._permits:
                    expired_at = await self._r.get(self._keys(tenant, session_id)[1])
            except REDIS_ERRORS as e:
                raise self._down(e) from e
            if expired_at is not None and float(expired_at) <= self.clock():
                raise SessionExpired(f"session {session_id!r} expired at {fmt_time(float(expired_at))} "
                                     "after its idle TTL")
            raise SessionNotFound(f"session {session_id!r} does not exist")
        return from_hash(h, tenant, session_id)

    async def create(self, record: SessionRecord, *, max_sessions: int = 0, max_tenant_sessions: int = 0) -> None:
        ttl_ms, tomb_ms = self._ms(record.ttl)
        wid = os.urandom(8)
        try:
            res = await self._write(self._create, self._keys(record.tenant, record.session_id),
                                    [ttl_ms, tomb_ms, repr(record.expires_at), max_sessions, max_tenant_sessions,
                                     record.session_id, self._member(record.tenant, record.session_id),
                                     *to_hash(record, wid)], applied=1)
        except REDIS_ERRORS as e:
            raise self._down(e) from e
        if res == 1:
            self._remember(record.copy(token=wid))
        if res == 0:
            raise AlreadyExists(f"session {record.session_id!r} already exists")
        if res == -1:
            raise server_limit(max_sessions)
        if res == -2:
            raise tenant_limit(record.tenant, max_tenant_sessions)

    def _put_entry(self, record: SessionRecord, prev_offset: int, token: bytes, wid: bytes) -> bytes:
        """A session's entry in the put script's argument (MessagePack): `token` is the write id it was read
        with (compared, when there is one: a record read from a hash written before write ids existed has
        none), `wid` the write's own."""
        return self._entry(record.tenant, record.session_id, record.ttl, prev_offset, record.expires_at, token,
                           packed_hash(record, wid))

    def _entry(self, tenant: str, session_id: str, ttl: float, prev_offset: int, expires: float, token: bytes,
               fields: bytes) -> bytes:
        """The put script's entry for a session: its arguments (see _PUT), then its hash's packed fields."""
        ttl_ms, tomb_ms = self._ms(ttl)
        head = [b"%d" % ttl_ms, b"%d" % tomb_ms, b"%d" % prev_offset, repr(expires).encode(), session_id.encode(),
                self._member(tenant, session_id).encode(), token]
        return b"".join([mp_array(8), *map(mp_str, head), fields])

    def _carry(self, key: tuple[str, str], token: bytes, offset: int, wid: bytes) -> None:
        """This store's last write of a session (see _token), at most CARRIED of them."""
        self._carried[key] = (token, offset, wid)
        if len(self._carried) > CARRIED:
            self._carried.popitem(last=False)

    def _outcome(self, record: SessionRecord, res: object, wid: bytes) -> RecurError | None:
        """What the put script's answer means: -2 applied, else why not (`_refusal`). Hints follow."""
        key = (record.tenant, record.session_id)
        if res == -2:
            self._remember(record.copy(token=wid))
            self._carry(key, record.token, record.offset, wid)
            return None
        self._forget(key)
        return self._refusal(record.session_id, res)

    @staticmethod
    def _refusal(session_id: str, res: object) -> RecurError:
        """A put script's answer other than -2 (applied): -1 no such session, -3 written since it was read
        (another version of the session at that offset), else the actual offset."""
        if res == -1:
            return SessionNotFound(f"session {session_id!r} does not exist")
        if res == -3:
            return StoreConflict(f"session {session_id!r} was written since it was read", None)
        return StoreConflict(f"session {session_id!r} is at offset {res}", int(res))  # type: ignore[call-overload]

    async def put(self, record: SessionRecord, prev_offset: int) -> None:
        error = (await self.put_many([(record, prev_offset)]))[0]
        if error is not None:
            raise error

    async def put_many(self, writes: list[tuple[SessionRecord, int]]) -> list[Exception | None]:
        """The writes in one pipelined round trip: a put script (EVALSHA) per PUT_SESSIONS sessions (one per
        session on a cluster, whose sessions lie in many slots), each session's write compare-and-set."""
        if not writes:
            return []
        wids = [os.urandom(8) for _ in writes]
        keys = [(r.tenant, r.session_id) for r, _ in writes]
        entries = [self._put_entry(r, prev, self._token(r, prev), wid) for (r, prev), wid in zip(writes, wids)]
        results = await self._put_all(keys, entries)
        out: list[Exception | None] = []
        for (record, _), res, wid in zip(writes, results, wids):
            out.append(res if isinstance(res, Exception) else self._outcome(record, res, wid))
        return out

    async def _put_all(self, keys: list[tuple[str, str]], entries: list[bytes]) -> list[Any]:
        """The put scripts' answers, one per write, or the error a write met (Redis unreachable, too few
        replicas confirmed it): those writes' hints are forgotten."""
        if not keys:
            return []
        try:
            outcomes, acked = await settled(self._put_pipeline(keys, entries))
            unconfirmed = await settled(self._unconfirmed(keys, outcomes, acked))
        except REDIS_ERRORS as e:
            for key in keys:
                self._forget(key)
            return [self._down(e)] * len(keys)
        out: list[Any] = []
        for key, res in zip(keys, outcomes):
            error = unconfirmed.get(self._keys(*key)[0]) if res == -2 else None
            if isinstance(res, Exception) or error is not None:
                self._forget(key)
                out.append(error or self._down(cast(Exception, res)))
            else:
                out.append(res)
        return out

    # -- the row round: a round's sessions as hint rows ------------------------------------------------
    async def read_rows(self, tenant: str, session_ids: list[str]) -> list[Loc | Exception] | None:
        """The sessions' hint rows when this replica holds every one, live; else None (the record round reads
        them). Hints: a write the put script's compare-and-set refuses runs again from a fresh read."""
        t, out = self.clock(), []
        for session_id in session_ids:
            loc = self._hints.loc((tenant, session_id))
            if loc is None or loc[0].expires(loc[1]) <= t:
                return None
            out.append(loc)
        self.hint_hits += len(out)
        return cast(list[Loc | Exception], out)

    async def write_rows(self, tenant: str, w: RowWrite) -> list[Exception | None]:
        """The rows' new records by the put scripts, each compare-and-set on the offset and write id its row
        was read with; the hint rows take the writes Redis applied. A row given up since it was read (its
        write id gone with it) is answered a conflict, so its chunk runs again from a fresh read."""
        n, out = len(w.rows), cast(list[Exception | None], [None] * len(w.rows))
        held = ~w.block.stale(w.rows, w.gens, w.offsets)
        at = np.flatnonzero(held).tolist()
        for j in np.flatnonzero(~held).tolist():
            out[j] = StoreConflict(f"session {w.session_ids[j]!r} was written since it was read", None)
        keys = [(tenant, w.session_ids[j]) for j in at]
        read = [self._tokens[key] for key in keys]
        wids = [os.urandom(8) for _ in at]
        entries = self._row_entries(tenant, w, at, read, wids)
        results = await self._put_all(keys, entries)
        # rows given up while the scripts ran take nothing (a fresh read may hold the session again meanwhile)
        still = ~w.block.stale(w.rows, w.gens, w.offsets)
        applied = np.zeros(n, bool)
        for j, key, res, token, wid in zip(at, keys, results, read, wids):
            if isinstance(res, Exception):
                out[j] = res
            elif res == -2:
                applied[j] = True
                if still[j]:
                    self._tokens[key] = wid
                self._carry(key, token, int(w.offsets[j] + w.steps[j]), wid)
            else:
                self._forget(key)
                out[j] = self._refusal(w.session_ids[j], res)
        if applied.any():
            self._hints.commit(w.only(applied))
            self._bound()
        return out

    def _row_entries(self, tenant: str, w: RowWrite, at: list[int], tokens: list[bytes],
                     wids: list[bytes]) -> list[bytes]:
        """Rows `at` of a row write as the put script's entries: what _put_entry gives for each row's record
        (`w.record(j)`, byte for byte: tested), its arrays encoded a column at a time."""
        b, n = w.block, len(w.rows)
        states, finals = pack_rows(w.states), pack_rows([w.final[None]]) if n else []
        kept = w.kept or [None] * n
        model, version, updated = b.model.encode(), b"%d" % b.version, repr(w.t).encode()
        out = []
        for j, token, wid in zip(at, tokens, wids):
            start, ttl, k = int(w.offsets[j]), float(w.ttl[j]), kept[j]
            prev = b"" if w.complete[j] else pack_arrays([s[:, j] for s in w.before])
            values = [model, version, b"%d" % (start + int(w.steps[j])), repr(float(w.created[j])).encode(), updated,
                      repr(ttl).encode(), states[j], w.digests[j], b"%d" % start,
                      finals[j] if k is None else pack_arrays([k]), prev, b"", wid]
            out.append(self._entry(tenant, w.session_ids[j], ttl, start, w.t + ttl, token, packed_values(values)))
        return out

    _wait_in_pipeline = True  # one connection carries the whole pipeline (not so on a cluster)

    _put_sessions = PUT_SESSIONS  # sessions one put script may write: their keys must share a slot on a cluster

    async def _put_pipeline(self, keys: list[tuple[str, str]], entries: list[bytes]) -> tuple[list, int | None]:
        """The put scripts in one pipeline (with min_replicas, and a WAIT after them where one connection
        carries them all); each write's answer and the fewest replicas a WAIT confirmed (None: none asked).
        A script's error (NOSCRIPT: it ran nothing) is the answer of each of its writes; after a NOSCRIPT
        those writes alone run again once the script is loaded."""
        outcomes: list = [None] * len(keys)
        todo, acked = list(range(len(keys))), None
        for attempt in range(2):
            groups = [todo[a : a + self._put_sessions] for a in range(0, len(todo), self._put_sessions)]
            async with self._permits, self._r.pipeline(transaction=False) as pipe:
                for group in groups:
                    names = [k for i in group for k in self._keys(*keys[i])]
                    pipe.evalsha(self._put.sha, len(names), *names,
                                 b"".join([mp_array(len(group)), *(entries[i] for i in group)]))
                wait = bool(self.min_replicas and self._wait_in_pipeline)
                if wait:
                    pipe.execute_command("WAIT", self.min_replicas, max(1, int(self.wait_timeout * 1000)))
                got = await pipe.execute(raise_on_error=False)
            if wait:
                n = got.pop()
                if isinstance(n, Exception):
                    raise n
                acked = int(n) if acked is None else min(acked, int(n))
            for group, res in zip(groups, got):
                for j, i in enumerate(group):
                    outcomes[i] = res if isinstance(res, Exception) else res[j]
            todo = [i for i in todo if isinstance(outcomes[i], NoScriptError)]
            if attempt or not todo:
                return outcomes, acked
            async with self._permits:
                await self._r.script_load(_PUT)
        raise AssertionError("unreachable")

    async def _unconfirmed(self, keys: list[tuple[str, str]], outcomes: list,
                           acked: int | None) -> dict[str, Unavailable]:
        """With min_replicas: the applied writes (by session key) that too few replicas confirmed."""
        if not self.min_replicas:
            return {}
        names = [self._keys(*key)[0] for key, res in zip(keys, outcomes) if res == -2]
        if acked is not None:
            error = self._unreplicated(acked)
            return {} if error is None else dict.fromkeys(names, error)
        try:
            await self._confirm(names)
        except Unavailable as e:
            return dict.fromkeys(names, e)
        return {}

    async def delete(self, tenant: str, session_id: str) -> None:
        self._forget((tenant, session_id))
        for _ in range(2):
            try:
                deleted = await settled(self._write(self._delete, self._keys(tenant, session_id),
                                                    [session_id, self._member(tenant, session_id)], applied=1))
            except REDIS_ERRORS as e:
                raise self._down(e) from e
            if deleted:
                return
            await self.get(tenant, session_id)  # NOT_FOUND or "expired at ..."; else it was created meanwhile
        raise SessionNotFound(f"session {session_id!r} does not exist")

    async def count(self, tenant: str | None = None) -> int:
        key = _GLOBAL if tenant is None else f"{_GLOBAL}:{tenant}"
        try:
            return int(await self._evalsha(self._count, [key], []))
        except REDIS_ERRORS as e:
            raise self._down(e) from e

    async def list_sessions(self, tenant: str, model: str = "", after_id: str = "",
                            limit: int = 100) -> list[SessionSummary]:
        """From the tenant's live set (never a SCAN): its ids sorted here (its scores are expiry
        times, so Redis cannot order it by id), then the hashes after `after_id` read a page at a
        time in one pipeline each; an id whose hash has expired is skipped."""
        try:
            async with self._permits:
                members = cast(list[bytes], await self._r.zrange(f"{_GLOBAL}:{tenant}", 0, -1))
        except REDIS_ERRORS as e:
            raise self._down(e) from e
        return await self._summaries(tenant, sorted(i for i in (m.decode() for m in members) if i > after_id),
                                     model, limit)

    async def _summaries(self, tenant: str, ids: list[str], model: str, limit: int) -> list[SessionSummary]:
        """Up to `limit` summaries of these sorted ids' sessions, read a page at a time in one pipeline
        each; an id whose hash has expired is skipped."""
        out: list[SessionSummary] = []
        try:
            while ids and len(out) < limit:
                page, ids = ids[:limit], ids[limit:]
                async with self._permits, self._r.pipeline(transaction=False) as pipe:
                    for sid in page:
                        pipe.hmget(self._keys(tenant, sid)[0], _SUMMARY_FIELDS)
                    rows = await pipe.execute()
                for sid, row in zip(page, rows):
                    if row[0] is None or (model and row[0].decode() != model) or len(out) >= limit:
                        continue
                    values = {name: hash_value(name, raw) for name, raw in zip(_SUMMARY, row)}
                    ttl = values.pop("ttl")
                    out.append(SessionSummary(session_id=sid, expires_at=values["updated_at"] + ttl, **values))
        except REDIS_ERRORS as e:
            raise self._down(e) from e
        return out

    async def ping(self) -> None:
        try:
            await self._r.ping()
        except REDIS_ERRORS as e:  # not logged here: the health watcher logs the transitions
            raise Unavailable(f"the redis session store is unreachable ({e.__class__.__name__})") from e

    async def sweep(self) -> int:
        return 0  # Redis expires idle sessions itself; the create script trims the live sets

    async def close(self) -> None:
        await self._r.aclose()
