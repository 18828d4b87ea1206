"""In-memory store: for tests and `--durability none`.

Bounded by count (`capacity`) and by bytes (`memory_bytes`): a create over either bound is refused
with LimitExceeded naming it. A session is never evicted to make room for another: whoever holds
it keeps it until it is deleted or expires. An existing session's write never fails for size (a
record grows by at most the replay bound).
"""

from __future__ import annotations

import heapq
import time

from service.errors import (
    AlreadyExists,
    LimitExceeded,
    RecurError,
    SessionExpired,
    SessionNotFound,
    StoreConflict,
)
from service.store.base import (
    DEFAULT_CAPACITY,
    DEFAULT_MEMORY_BYTES,
    DEFAULT_TOMBSTONE_SECONDS,
    Clock,
    SessionRecord,
    SessionSummary,
    Store,
    Tombstone,
    fmt_time,
    server_limit,
    tenant_limit,
)

Key = tuple[str, str]


class MemoryStore(Store):
    """Holds at most `capacity` sessions and `memory_bytes` bytes of records (0: no bound)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, tombstone_seconds: float = DEFAULT_TOMBSTONE_SECONDS,
                 clock: Clock = time.time, *, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        self.capacity = capacity
        self.memory_bytes = memory_bytes
        self.tombstone_seconds = tombstone_seconds
        self.clock = clock
        self._records: dict[Key, SessionRecord] = {}
        self._tombstones: dict[Key, Tombstone] = {}
        self._tenants: dict[str, int] = {}  # live records per tenant
        self._models: dict[tuple[str, int], int] = {}  # live records per (model, version)
        self._bytes = 0  # sum of the records' nbytes
        # (expires_at, tenant, id) of every write; an entry is stale once its record was renewed or removed.
        self._expiry: list[tuple[float, str, str]] = []

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _missing(self, key: Key) -> Exception:
        t = self._tombstones.get(key)
        if t is None:
            return SessionNotFound(f"session {key[1]!r} does not exist")
        return SessionExpired(f"session {key[1]!r} expired at {fmt_time(t.at)} after its idle TTL")

    # -- bookkeeping: every change of _records goes through _add and _remove ------------------
    def _add(self, key: Key, rec: SessionRecord) -> None:
        old = self._records.get(key)
        if old is None:
            self._tenants[key[0]] = self._tenants.get(key[0], 0) + 1
            # one heap entry per record, pushed on create: a renewal only moves the expiry later, and
            # _expire_due pushes a renewed record's entry again when the old time comes (no push per write)
            heapq.heappush(self._expiry, (rec.expires_at, key[0], key[1]))
        else:
            self._bytes -= old.nbytes
        if old is None or old.model != rec.model or old.version != rec.version:
            if old is not None:
                self._uncount((old.model, old.version))
            self._models[(rec.model, rec.version)] = self._models.get((rec.model, rec.version), 0) + 1
        self._records[key] = rec
        self._bytes += rec.nbytes
        if len(self._expiry) > 2 * len(self._records) + 1024:  # drop the stale entries
            self._expiry = [(r.expires_at, k[0], k[1]) for k, r in self._records.items()]
            heapq.heapify(self._expiry)

    def _remove(self, key: Key) -> SessionRecord:
        rec = self._records.pop(key)
        self._bytes -= rec.nbytes
        self._uncount((rec.model, rec.version))
        n = self._tenants[key[0]] - 1
        if n:
            self._tenants[key[0]] = n
        else:
            del self._tenants[key[0]]
        return rec

    def _uncount(self, model: tuple[str, int]) -> None:
        n = self._models[model] - 1
        if n:
            self._models[model] = n
        else:
            del self._models[model]

    def _expire(self, key: Key, rec: SessionRecord) -> None:
        self._remove(key)
        self._tombstones[key] = Tombstone(key[0], key[1], rec.expires_at, "expired")

    def _expire_due(self, t: float) -> int:
        """Expire every record whose time has come (cheap when none has): counts and bounds hold live ones."""
        n = 0
        while self._expiry and self._expiry[0][0] <= t:
            _, tenant, sid = heapq.heappop(self._expiry)
            rec = self._records.get((tenant, sid))
            if rec is None:
                continue
            if rec.expires_at <= t:
                self._expire((tenant, sid), rec)
                n += 1
            else:  # renewed since it was pushed
                heapq.heappush(self._expiry, (rec.expires_at, tenant, sid))
        return n

    def _live(self, key: Key) -> SessionRecord:
        rec = self._records.get(key)
        if rec is not None and rec.expires_at <= self.clock():
            self._expire(key, rec)
            rec = None
        if rec is None:
            raise self._missing(key)
        return rec

    # -- the interface ---------------------------------------------------------------------------
    async def get(self, tenant: str, session_id: str) -> SessionRecord:
        return self._live((tenant, session_id))

    async def create(self, record: SessionRecord, *, max_sessions: int = 0, max_tenant_sessions: int = 0) -> None:
        key = (record.tenant, record.session_id)
        t = self.clock()
        self._expire_due(t)
        if key in self._records:
            raise AlreadyExists(f"session {record.session_id!r} already exists")
        # One turn of the event loop from the checks to the insert: concurrent creates cannot overshoot.
        if max_tenant_sessions and self._tenants.get(record.tenant, 0) >= max_tenant_sessions:
            raise tenant_limit(record.tenant, max_tenant_sessions)
        if max_sessions and len(self._records) >= max_sessions:
            raise server_limit(max_sessions)
        if self.capacity and len(self._records) >= self.capacity:
            raise LimitExceeded(f"the memory store holds its limit of {self.capacity} sessions; "
                                "delete sessions or raise --memory-capacity")
        if self.memory_bytes and self._bytes + record.nbytes > self.memory_bytes:
            raise LimitExceeded(f"the memory store holds {self._bytes} bytes of sessions and this one needs "
                                f"{record.nbytes} more, over its limit of {self.memory_bytes} bytes; "
                                "delete sessions or raise --memory-bytes")
        self._tombstones.pop(key, None)
        self._add(key, record)

    async def get_many(self, tenant: str, session_ids: list[str]) -> list[SessionRecord | Exception]:
        out: list[SessionRecord | Exception] = []
        for session_id in session_ids:  # no await per record: the packed path's batches
            try:
                out.append(self._live((tenant, session_id)))
            except RecurError as e:
                out.append(e)
        return out

    async def put(self, record: SessionRecord, prev_offset: int) -> None:
        self._put(record, prev_offset)

    async def put_many(self, writes: list[tuple[SessionRecord, int]]) -> list[Exception | None]:
        out: list[Exception | None] = []
        for record, prev_offset in writes:
            try:
                self._put(record, prev_offset)
                out.append(None)
            except RecurError as e:
                out.append(e)
        return out

    def _put(self, record: SessionRecord, prev_offset: int) -> None:
        key = (record.tenant, record.session_id)
        current = self._live(key)
        if current.offset != prev_offset:
            raise StoreConflict(f"session {record.session_id!r} is at offset {current.offset}", current.offset)
        self._add(key, record)  # never refused for size: a record grows by at most the replay bound

    async def delete(self, tenant: str, session_id: str) -> None:
        key = (tenant, session_id)
        self._live(key)
        self._remove(key)

    async def count(self, tenant: str | None = None) -> int:
        self._expire_due(self.clock())
        return len(self._records) if tenant is None else self._tenants.get(tenant, 0)

    async def count_by_model(self, tenant: str | None = None) -> dict[tuple[str, int], int] | None:
        self._expire_due(self.clock())
        if tenant is None:
            return dict(self._models)
        counts: dict[tuple[str, int], int] = {}
        for r in self._records.values():
            if r.tenant == tenant:
                counts[(r.model, r.version)] = counts.get((r.model, r.version), 0) + 1
        return counts

    async def list_sessions(self, tenant: str, model: str = "", after_id: str = "",
                            limit: int = 100) -> list[SessionSummary]:
        """A sorted scan of the tenant's live records (this store holds at most `capacity`)."""
        t = self.clock()
        ids = sorted(sid for (ten, sid), r in self._records.items()
                     if ten == tenant and sid > after_id and r.expires_at > t and (not model or r.model == model))
        return [SessionSummary.of(self._records[(tenant, sid)]) for sid in ids[:limit]]

    async def ping(self) -> None:
        return None  # the process's own memory: it serves while the process runs

    async def sweep(self) -> int:
        t = self.clock()
        n = self._expire_due(t)
        for k in [k for k, tomb in self._tombstones.items() if tomb.at < t - self.tombstone_seconds]:
            del self._tombstones[k]
        return n
