"""Redis store: shared by many replicas.

A session is one hash, `recur:{tenant}:s:{id}`, expiring with its idle TTL. Beside it a small
key `recur:{tenant}:t:{id}` holds the session's expiry time and outlives it by
`tombstone_seconds`, so an expired id is answered "expired at ..." rather than "does not exist".

Every write is one Lua script, atomic in Redis: a put applies only if the stored offset is
the one the write started from (compare-and-set), so two replicas can never both advance one
session. There is no in-process cache: every chunk reads the record, and the script decides.
A reply is sent after Redis acknowledged the write; how durable that is, is Redis's
persistence setting (the compose file runs it with appendonly yes, appendfsync everysec).
"""

from __future__ import annotations

import logging
import time
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.errors import AlreadyExists, RecurError, SessionExpired, SessionNotFound, StoreConflict, Unavailable
from service.store.base import (
    DEFAULT_TOMBSTONE_SECONDS,
    Clock,
    SessionRecord,
    Store,
    fmt_time,
    pack_arrays,
    settled,
    unpack_arrays,
)

log = logging.getLogger(__name__)

# ARGV: ttl_ms, tombstone_ms, expires, then field/value pairs
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
return 1
"""
# ARGV: ttl_ms, tombstone_ms, prev_offset, expires, then field/value pairs
_PUT = """
local cur = redis.call('HGET', KEYS[1], 'offset')
if not cur then return -1 end
if tonumber(cur) ~= tonumber(ARGV[3]) then return tonumber(cur) end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[2])
return -2
"""


class RedisStore(Store):
    def __init__(self, url: str, *, tombstone_seconds: float = DEFAULT_TOMBSTONE_SECONDS, timeout: float = 2.0,
                 clock: Clock = time.time) -> None:
        self.url, self.clock = url, clock
        self.tombstone_seconds = tombstone_seconds
        self._r = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._create = self._r.register_script(_CREATE)
        self._put = self._r.register_script(_PUT)

    def _keys(self, tenant: str, session_id: str) -> list[str]:
        return [f"recur:{tenant}:s:{session_id}", f"recur:{tenant}:t:{session_id}"]

    def _down(self, e: Exception) -> Unavailable:
        log.warning("redis %s: %s", self.url, e)
        return Unavailable(f"the session store ({self.url}) is unreachable; nothing was applied, retry shortly")

    @staticmethod
    def _fields(r: SessionRecord) -> list:
        logits = b"" if r.last_logits is None else pack_arrays([r.last_logits])
        return ["model", r.model, "version", r.version, "offset", r.offset, "created", repr(r.created_at),
                "updated", repr(r.updated_at), "ttl", repr(r.ttl), "state", pack_arrays(r.state),
                "last_digest", r.last_digest, "last_start", r.last_start, "last_logits", logits]

    def _ms(self, r: SessionRecord) -> tuple[int, int]:
        ttl_ms = max(1, int(r.ttl * 1000))
        return ttl_ms, ttl_ms + int(self.tombstone_seconds * 1000)

    async def get(self, tenant: str, session_id: str) -> SessionRecord:
        try:
            h = cast(dict[bytes, bytes], await self._r.hgetall(self._keys(tenant, session_id)[0]))
        except RedisError as e:
            raise self._down(e) from e
        return await self._record(tenant, session_id, h)

    async def get_many(self, tenant: str, session_ids: list[str]) -> list[SessionRecord | Exception]:
        """One pipelined round trip for the whole batch."""
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                for session_id in session_ids:
                    pipe.hgetall(self._keys(tenant, session_id)[0])
                hashes = await pipe.execute()
        except RedisError as e:
            return [self._down(e)] * len(session_ids)
        results: list[SessionRecord | Exception] = []
        for session_id, h in zip(session_ids, hashes):
            try:
                results.append(await self._record(tenant, session_id, h))
            except RecurError as e:
                results.append(e)
        return results

    async def _record(self, tenant: str, session_id: str, h: dict[bytes, bytes]) -> SessionRecord:
        if not h:
            try:
                expired_at = await self._r.get(self._keys(tenant, session_id)[1])
            except RedisError as e:
                raise self._down(e) from e
            if expired_at is not None and float(expired_at) <= self.clock():
                raise SessionExpired(f"session {session_id!r} expired at {fmt_time(float(expired_at))} "
                                     "after its idle TTL")
            raise SessionNotFound(f"session {session_id!r} does not exist")
        logits = h[b"last_logits"]
        return SessionRecord(
            tenant=tenant, session_id=session_id, model=h[b"model"].decode(), version=int(h[b"version"]),
            offset=int(h[b"offset"]), created_at=float(h[b"created"]), updated_at=float(h[b"updated"]),
            ttl=float(h[b"ttl"]), state=unpack_arrays(h[b"state"]), last_digest=h[b"last_digest"],
            last_start=int(h[b"last_start"]), last_logits=unpack_arrays(logits)[0] if logits else None,
        )

    async def create(self, record: SessionRecord) -> None:
        ttl_ms, tomb_ms = self._ms(record)
        try:
            ok = await self._create(keys=self._keys(record.tenant, record.session_id),
                                    args=[ttl_ms, tomb_ms, repr(record.expires_at), *self._fields(record)])
        except RedisError as e:
            raise self._down(e) from e
        if not ok:
            raise AlreadyExists(f"session {record.session_id!r} already exists")

    def _args(self, record: SessionRecord, prev_offset: int) -> list:
        ttl_ms, tomb_ms = self._ms(record)
        return [ttl_ms, tomb_ms, prev_offset, repr(record.expires_at), *self._fields(record)]

    @staticmethod
    def _outcome(record: SessionRecord, res: object) -> RecurError | None:
        """What the put script's answer means: -2 applied, -1 no such session, else the actual offset."""
        if res == -2:
            return None
        if res == -1:
            return SessionNotFound(f"session {record.session_id!r} does not exist")
        return StoreConflict(f"session {record.session_id!r} is at offset {res}", int(res))  # type: ignore[call-overload]

    async def put(self, record: SessionRecord, prev_offset: int) -> None:
        keys = self._keys(record.tenant, record.session_id)
        try:
            res = await settled(self._put(keys=keys, args=self._args(record, prev_offset)))
        except RedisError as e:
            raise self._down(e) from e
        error = self._outcome(record, res)
        if error is not None:
            raise error

    async def put_many(self, writes: list[tuple[SessionRecord, int]]) -> list[Exception | None]:
        """All the scripts in one pipelined round trip; each still atomic and compare-and-set."""
        if not writes:
            return []
        pipe = self._r.pipeline(transaction=False)
        for record, prev_offset in writes:
            await self._put(keys=self._keys(record.tenant, record.session_id), args=self._args(record, prev_offset),
                            client=pipe)
        try:
            outcomes = await settled(pipe.execute(raise_on_error=False))
        except RedisError as e:
            return [self._down(e)] * len(writes)
        finally:
            await pipe.reset()
        return [self._down(res) if isinstance(res, Exception) else self._outcome(record, res)
                for (record, _), res in zip(writes, outcomes)]

    async def delete(self, tenant: str, session_id: str) -> None:
        await self.get(tenant, session_id)  # NOT_FOUND / expired first
        try:
            await self._r.delete(*self._keys(tenant, session_id))
        except RedisError as e:
            raise self._down(e) from e

    async def count(self) -> int:
        try:
            return sum([1 async for _ in self._r.scan_iter(match="recur:*:s:*", count=1000)])
        except RedisError as e:
            raise self._down(e) from e

    async def sweep(self) -> int:
        return 0  # Redis expires idle sessions itself

    async def close(self) -> None:
        await self._r.aclose()
