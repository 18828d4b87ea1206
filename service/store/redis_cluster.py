"""Redis Cluster store: the Redis store's scripts under keys that put everything one write touches in
one hash slot.

A session belongs to bucket `b = crc32(tenant NUL id) % B` (`?buckets=B` in the URL, default 256;
fixed for a cluster's life: a store opened with another count is refused). Each bucket has a hash
tag `{T}` whose slot lies in the bucket's share of the 16384 slots, so a cluster that splits its
slots into equal ranges holds equal shares of buckets. The keys of a session in bucket b:

    recur:{T}:TENANT:s:ID    the session hash          recur-live:{T}:TENANT   the tenant's live set, bucket b
    recur:{T}:TENANT:t:ID    its expiry (tombstone)    recur-live:{T}          everyone's live set, bucket b

so the put and delete scripts are the single Redis's, and nothing a chunk touches is shared by
sessions of other buckets. Counting sums the buckets' live sets with one script per node
(`allow-cross-slot-keys`: keys of several slots, all on that node); a node that refuses it (a slot
on the move) is counted set by set through the cluster client, which follows MOVED and ASK.

Limits: a create reads the other buckets' live counts, then its script checks them plus its own
bucket's exact count and stores the session in one step. Creates of one store run one at a time
while a limit is set, so a create that starts after the limit was reached is refused; creates
already in flight then, at most one per other store (replica process), may still land: the count
can exceed a limit by at most the number of replica processes minus one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import zlib
from binascii import crc_hqx
from typing import Any, cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript as Script

from service.errors import AlreadyExists, Unavailable
from service.store.base import SessionRecord, SessionSummary, server_limit, tenant_limit
from service.store.record import to_hash
from service.store.redis import _NOW, REDIS_ERRORS, RedisStore

log = logging.getLogger(__name__)

SLOTS = 16384
DEFAULT_BUCKETS = 256
_LAYOUT = "recur-layout"  # the bucket count the cluster was laid out with

# As the single Redis's create, with the other buckets' live counts (ARGV[8], ARGV[9]) added to this one's.
# KEYS: session, tombstone, tenant set, global set (one bucket)
# ARGV: ttl_ms, tombstone_ms, expires, max_sessions, max_tenant_sessions, id, member, others_all,
#       others_tenant, then field/value pairs
_CREATE = _NOW + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local max_tenant = tonumber(ARGV[5])
if max_tenant > 0 and redis.call('ZCARD', KEYS[3]) + tonumber(ARGV[9]) >= max_tenant then return -2 end
local max_all = tonumber(ARGV[4])
if max_all > 0 and redis.call('ZCARD', KEYS[4]) + tonumber(ARGV[8]) >= max_all then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 10))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[1]), ARGV[6])
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[1]), ARGV[7])
return 1
"""
# ARGV (not KEYS: declared keys must share a slot even so): live sets of several buckets, all on the node
# that runs it; their live members together. A set not served here is an error, never a wrong count.
_COUNT_MANY = "#!lua flags=allow-cross-slot-keys\n" + _NOW + """
local n = 0
for _, key in ipairs(ARGV) do n = n + redis.call('ZCOUNT', key, '(' .. now, '+inf') end
return n
"""


@functools.cache
def bucket_tags(buckets: int) -> tuple[str, ...]:
    """Bucket b's hash tag: the first decimal number whose slot lies in [b, b + 1) * 16384 / buckets."""
    if not 1 <= buckets <= SLOTS:
        raise ValueError(f"buckets must be 1 to {SLOTS}, not {buckets}")
    tags: list[str | None] = [None] * buckets
    left, i = buckets, 0
    while left:
        tag = str(i)
        b = (crc_hqx(tag.encode(), 0) % SLOTS) * buckets // SLOTS
        if tags[b] is None:
            tags[b], left = tag, left - 1
        i += 1
    return tuple(cast(list[str], tags))


class ClusterStore(RedisStore):
    """The Redis store on a Redis Cluster (`redis+cluster://`): same records, scripts, hints, write ids
    and exactly-once; keys hash-tagged by bucket; limits bounded as the module says."""

    _wait_in_pipeline = False  # a cluster pipeline spreads over nodes: writes are confirmed per node
    _put_sessions = 1  # a script's keys must share a slot: one session's four do

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.buckets = int(self.parsed.params.get("buckets", DEFAULT_BUCKETS))
        self._tags = bucket_tags(self.buckets)
        self._create_cluster = self._r.register_script(_CREATE)
        self._creating = asyncio.Lock()
        self._nodes: dict[str, aioredis.Redis] = {}  # plain clients of single nodes: WAIT, per-node counts
        self._layout_checked = False

    # -- layout ----------------------------------------------------------------------------------
    def _bucket(self, tenant: str, session_id: str) -> int:
        return zlib.crc32(f"{tenant}\0{session_id}".encode()) % self.buckets

    def _keys(self, tenant: str, session_id: str) -> list[str]:  # type: ignore[override]
        tag = self._tags[self._bucket(tenant, session_id)]
        return [f"recur:{{{tag}}}:{tenant}:s:{session_id}", f"recur:{{{tag}}}:{tenant}:t:{session_id}",
                f"recur-live:{{{tag}}}:{tenant}", f"recur-live:{{{tag}}}"]

    def _sets(self, tenant: str | None, skip: int = -1) -> list[str]:
        """The live sets of every bucket but `skip`: the tenant's, or everyone's."""
        suffix = "" if tenant is None else f":{tenant}"
        return [f"recur-live:{{{tag}}}{suffix}" for b, tag in enumerate(self._tags) if b != skip]

    async def open(self) -> ClusterStore:
        """Check (or, on an empty cluster, record) the bucket count; a cluster not reachable yet is
        checked at the first read or create instead."""
        try:
            await self._check_layout()
        except Unavailable as e:
            log.warning("redis cluster: %s; the layout is checked once it answers", e)
        return self

    async def _check_layout(self) -> None:
        if self._layout_checked:
            return
        try:
            async with self._permits:
                await self._r.set(_LAYOUT, self.buckets, nx=True)
                stored = int(await self._r.get(_LAYOUT))
        except REDIS_ERRORS as e:
            raise self._down(e) from e
        if stored != self.buckets:
            raise ValueError(f"this cluster's sessions are laid out in {stored} buckets, not {self.buckets}: "
                             f"use ?buckets={stored} in the store URL")
        self._layout_checked = True

    # -- one node at a time ------------------------------------------------------------------------
    def _node(self, name: str) -> aioredis.Redis:
        client = self._nodes.get(name)
        if client is None:
            host, _, port = name.rpartition(":")
            client = self._nodes[name] = aioredis.Redis(
                host=host, port=int(port), username=self.parsed.username, password=self.parsed.password,
                socket_timeout=self.timeout, socket_connect_timeout=self.timeout)
        return client

    def _by_node(self, keys: list[str]) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(self._r.get_node_from_key(key).name, []).append(key)
        return groups

    async def _live(self, keys: list[str]) -> int:
        """Live members of these sets together (see the module's docstring)."""
        if not keys:
            return 0
        await self._r.initialize()  # the slot map get_node_from_key reads
        counts = await asyncio.gather(*(self._live_on(name, ks) for name, ks in self._by_node(keys).items()))
        return sum(counts)

    async def _live_on(self, name: str, keys: list[str]) -> int:
        try:
            async with self._permits:
                return int(await self._node(name).eval(_COUNT_MANY, 0, *keys))
        except REDIS_ERRORS:  # moved, moving or down: through the cluster client, which follows redirects
            return sum([int(await self._evalsha(self._count, [k], [])) for k in keys])

    async def _confirm(self, keys: list) -> None:
        """WAIT must follow the writes on their node's connection: one pipeline per node (a touch of each
        key, then WAIT) over a plain client of that node. A slot that moved meanwhile is UNAVAILABLE:
        the client's retry reads the session where it now is."""
        if not self.min_replicas or not keys:
            return
        wait_ms = max(1, int(self.wait_timeout * 1000))

        async def on(name: str, ks: list[str]) -> int:
            async with self._permits, self._node(name).pipeline(transaction=False) as pipe:
                for k in ks:
                    pipe.eval("return redis.call('PEXPIRE', KEYS[1], math.max(1, redis.call('PTTL', KEYS[1])))",
                              1, k)
                pipe.execute_command("WAIT", self.min_replicas, wait_ms)
                return int((await pipe.execute())[-1])

        try:
            acked = await asyncio.gather(*(on(n, ks) for n, ks in self._by_node(keys).items()))
        except REDIS_ERRORS as e:
            raise self._down(e) from e
        for n in acked:
            error = self._unreplicated(n)
            if error is not None:
                raise error

    async def _write(self, script: Script, keys: list, args: list, applied: object) -> Any:
        res = await self._evalsha(script, keys, args)
        if res == applied:
            await self._confirm([keys[0]])
        return res

    # -- what differs from one Redis ----------------------------------------------------------------
    async def fresh(self, tenant: str, session_id: str) -> SessionRecord:
        await self._check_layout()
        return await super().fresh(tenant, session_id)

    async def get_many(self, tenant: str, session_ids: list[str]) -> list[SessionRecord | Exception]:
        await self._check_layout()
        return await super().get_many(tenant, session_ids)

    async def create(self, record: SessionRecord, *, max_sessions: int = 0, max_tenant_sessions: int = 0) -> None:
        await self._check_layout()
        if max_sessions or max_tenant_sessions:
            async with self._creating:  # one at a time: the overshoot bound (module docstring)
                await self._create_one(record, max_sessions, max_tenant_sessions)
        else:
            await self._create_one(record, 0, 0)

    async def _create_one(self, record: SessionRecord, max_sessions: int, max_tenant_sessions: int) -> None:
        b = self._bucket(record.tenant, record.session_id)
        ttl_ms, tomb_ms = self._ms(record.ttl)
        wid = os.urandom(8)
        try:
            others_all, others_tenant = await asyncio.gather(
                self._live(self._sets(None, b)) if max_sessions else _zero(),
                self._live(self._sets(record.tenant, b)) if max_tenant_sessions else _zero())
            res = await self._write(self._create_cluster, self._keys(record.tenant, record.session_id),
                                    [ttl_ms, tomb_ms, repr(record.expires_at), max_sessions, max_tenant_sessions,
                                     record.session_id, self._member(record.tenant, record.session_id),
                                     others_all, others_tenant, *to_hash(record, wid)], applied=1)
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

    async def count(self, tenant: str | None = None) -> int:
        try:
            return await self._live(self._sets(tenant))
        except REDIS_ERRORS as e:
            raise self._down(e) from e

    async def list_sessions(self, tenant: str, model: str = "", after_id: str = "",
                            limit: int = 100) -> list[SessionSummary]:
        """The tenant's live sets of every bucket (one pipeline, never a SCAN), merged and sorted here;
        then as one Redis's."""
        try:
            async with self._permits, self._r.pipeline(transaction=False) as pipe:
                for key in self._sets(tenant):
                    pipe.zrange(key, 0, -1)
                members = [m for got in await pipe.execute() for m in got]
        except REDIS_ERRORS as e:
            raise self._down(e) from e
        return await self._summaries(tenant, sorted(i for i in (m.decode() for m in members) if i > after_id),
                                     model, limit)

    async def ping(self) -> None:
        """SERVING while the cluster covers all its slots (`cluster_state:ok`, as any node that answers
        says); a primary's failure is NOT_SERVING until its replica is promoted."""
        try:
            await self._r.initialize()
            names = [n.name for n in self._r.get_nodes()]
        except REDIS_ERRORS as e:
            raise Unavailable(f"the redis session store is unreachable ({e.__class__.__name__})") from e
        for name in names:
            try:
                info = await self._node(name).execute_command("CLUSTER INFO")
            except REDIS_ERRORS:
                continue
            state = info.get("cluster_state") if isinstance(info, dict) else None  # redis-py parses it
            if state == "ok":
                return
            raise Unavailable("the redis cluster does not serve all its slots (cluster_state is not ok)")
        raise Unavailable("the redis session store is unreachable (no cluster node answers)")

    async def close(self) -> None:
        for client in self._nodes.values():
            await client.aclose()
        await super().close()


async def _zero() -> int:
    return 0
