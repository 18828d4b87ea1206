"""In-memory store: for tests and `--durability none`.

Bounded by count (`capacity`) and by bytes (`memory_bytes`): a create over either bound is refused
with LimitExceeded naming it. A session is never evicted to make room for another: whoever holds
it keeps it until it is deleted or expires. An existing session's write never fails for size (a
record grows by at most the replay bound).
"""

from __future__ import annotations

import heapq
import time

import numpy as np

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
from service.store.table import Loc, Rows, RowWrite, Shapes, block_for, check_held

Key = tuple[str, str]


class MemoryStore(Store):
    """Holds at most `capacity` sessions and `memory_bytes` bytes of records (0: no bound), as rows of a
    columnar session table (service/store/table.py): one block of rows per model version and state layout."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, tombstone_seconds: float = DEFAULT_TOMBSTONE_SECONDS,
                 clock: Clock = time.time, *, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        self.capacity = capacity
        self.memory_bytes = memory_bytes
        self.tombstone_seconds = tombstone_seconds
        self.clock = clock
        self._rows: dict[Key, Loc] = {}
        self._blocks: dict[tuple[str, int, Shapes], Rows] = {}
        self._tombstones: dict[Key, Tombstone] = {}
        self._tenants: dict[str, int] = {}  # live records per tenant
        self._models: dict[tuple[str, int], int] = {}  # live records per (model, version)
        self._bytes = 0  # sum of the rows' nbytes
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

    # -- bookkeeping: every change of _rows goes through _add and _remove ---------------------
    def _add(self, key: Key, rec: SessionRecord) -> None:
        loc = self._rows.get(key)
        block = block_for(self._blocks, rec)
        if loc is None:
            self._tenants[key[0]] = self._tenants.get(key[0], 0) + 1
            # one heap entry per record, pushed on create: a renewal only moves the expiry later, and
            # _expire_due pushes a renewed record's entry again when the old time comes (no push per write)
            heapq.heappush(self._expiry, (rec.expires_at, key[0], key[1]))
            r = block.allocate()
        else:
            old, r = loc
            self._bytes -= int(old.nbytes[r])
            if old is not block:  # another version or layout: another block
                self._uncount((old.model, old.version))
                old.release(r)
                r = block.allocate()
        if loc is None or loc[0] is not block:
            self._models[(rec.model, rec.version)] = self._models.get((rec.model, rec.version), 0) + 1
        block.write(r, rec)
        self._rows[key] = (block, r)
        self._bytes += int(block.nbytes[r])
        if len(self._expiry) > 2 * len(self._rows) + 1024:  # drop the stale entries
            self._expiry = [(self._expires(loc), k[0], k[1]) for k, loc in self._rows.items()]
            heapq.heapify(self._expiry)

    def _remove(self, key: Key) -> float:
        """Drop a session's row; returns when it expires (expired)."""
        block, r = self._rows.pop(key)
        expires = self._expires((block, r))
        self._bytes -= int(block.nbytes[r])
        block.release(r)
        self._uncount((block.model, block.version))
        n = self._tenants[key[0]] - 1
        if n:
            self._tenants[key[0]] = n
        else:
            del self._tenants[key[0]]
        return expires

    @staticmethod
    def _expires(loc: Loc) -> float:
        return float(loc[0].expires(loc[1]))

    def _uncount(self, model: tuple[str, int]) -> None:
        n = self._models[model] - 1
        if n:
            self._models[model] = n
        else:
            del self._models[model]

    def _expire(self, key: Key) -> None:
        self._tombstones[key] = Tombstone(key[0], key[1], self._remove(key), "expired")

    def _expire_due(self, t: float) -> int:
        """Expire every record whose time has come (cheap when none has): counts and bounds hold live ones."""
        n = 0
        while self._expiry and self._expiry[0][0] <= t:
            _, tenant, sid = heapq.heappop(self._expiry)
            loc = self._rows.get((tenant, sid))
            if loc is None:
                continue
            expires = self._expires(loc)
            if expires <= t:
                self._expire((tenant, sid))
                n += 1
            else:  # renewed since it was pushed
                heapq.heappush(self._expiry, (expires, tenant, sid))
        return n

    def _live(self, key: Key) -> Loc:
        loc = self._rows.get(key)
        if loc is not None and self._expires(loc) <= self.clock():
            self._expire(key)
            loc = None
        if loc is None:
            raise self._missing(key)
        return loc

    def _record(self, key: Key) -> SessionRecord:
        block, r = self._live(key)
        return block.record(r)

    def check(self) -> None:
        """The table's invariants (tests run it): every session's row is in use, in its block, held by
        it alone; the counts and the byte total are the rows'."""
        total = check_held(self._rows.items(), self._blocks.values())
        tenants: dict[str, int] = {}
        models: dict[tuple[str, int], int] = {}
        for (tenant, _), (block, _) in self._rows.items():
            tenants[tenant] = tenants.get(tenant, 0) + 1
            models[(block.model, block.version)] = models.get((block.model, block.version), 0) + 1
        assert tenants == self._tenants and models == self._models, "the counts are off"
        assert total == self._bytes, f"the byte count is off: {self._bytes}, rows {total}"

    # -- the interface ---------------------------------------------------------------------------
    async def get(self, tenant: str, session_id: str) -> SessionRecord:
        return self._record((tenant, session_id))

    async def create(self, record: SessionRecord, *, max_sessions: int = 0, max_tenant_sessions: int = 0) -> None:
        key = (record.tenant, record.session_id)
        t = self.clock()
        self._expire_due(t)
        if key in self._rows:
            raise AlreadyExists(f"session {record.session_id!r} already exists")
        # One turn of the event loop from the checks to the insert: concurrent creates cannot overshoot.
        if max_tenant_sessions and self._tenants.get(record.tenant, 0) >= max_tenant_sessions:
            raise tenant_limit(record.tenant, max_tenant_sessions)
        if max_sessions and len(self._rows) >= max_sessions:
            raise server_limit(max_sessions)
        if self.capacity and len(self._rows) >= self.capacity:
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
                out.append(self._record((tenant, session_id)))
            except RecurError as e:
                out.append(e)
        return out

    async def read_rows(self, tenant: str, session_ids: list[str]) -> list[Loc | Exception]:
        out: list[Loc | Exception] = []
        for session_id in session_ids:
            try:
                out.append(self._live((tenant, session_id)))
            except RecurError as e:
                out.append(e)
        return out

    async def write_rows(self, tenant: str, w: RowWrite) -> list[Exception | None]:
        t, b = self.clock(), w.block
        bad = b.stale(w.rows, w.gens, w.offsets) | (b.expires(w.rows) <= t)
        out: list[Exception | None] = [None] * len(w.rows)
        if bad.any():  # say why each is refused; the rest are stored
            for j in np.flatnonzero(bad).tolist():
                try:
                    block, r = self._live((tenant, w.session_ids[j]))
                    actual = int(block.offset[r])
                    out[j] = StoreConflict(f"session {w.session_ids[j]!r} is at offset {actual}", actual)
                except RecurError as e:
                    out[j] = e
            w = w.only(~bad)
        if len(w.rows):
            self._bytes += b.commit(w)
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
        block, r = self._live(key)
        if block.offset[r] != prev_offset:
            raise StoreConflict(f"session {record.session_id!r} is at offset {block.offset[r]}", int(block.offset[r]))
        self._add(key, record)  # never refused for size: a record grows by at most the replay bound

    async def delete(self, tenant: str, session_id: str) -> None:
        key = (tenant, session_id)
        self._live(key)
        self._remove(key)

    async def count(self, tenant: str | None = None) -> int:
        self._expire_due(self.clock())
        return len(self._rows) if tenant is None else self._tenants.get(tenant, 0)

    async def count_by_model(self, tenant: str | None = None) -> dict[tuple[str, int], int] | None:
        self._expire_due(self.clock())
        if tenant is None:
            return dict(self._models)
        counts: dict[tuple[str, int], int] = {}
        for (ten, _), (block, _) in self._rows.items():
            if ten == tenant:
                counts[(block.model, block.version)] = counts.get((block.model, block.version), 0) + 1
        return counts

    async def list_sessions(self, tenant: str, model: str = "", after_id: str = "",
                            limit: int = 100) -> list[SessionSummary]:
        """A sorted scan of the tenant's live records (this store holds at most `capacity`)."""
        t = self.clock()
        ids = sorted(sid for (ten, sid), loc in self._rows.items()
                     if ten == tenant and sid > after_id and self._expires(loc) > t
                     and (not model or loc[0].model == model))
        out = []
        for sid in ids[:limit]:
            block, r = self._rows[(tenant, sid)]
            out.append(SessionSummary(sid, block.model, block.version, int(block.offset[r]), float(block.created[r]),
                                      float(block.updated[r]), self._expires((block, r))))
        return out

    async def ping(self) -> None:
        return None  # the process's own memory: it serves while the process runs

    async def sweep(self) -> int:
        t = self.clock()
        n = self._expire_due(t)
        for k in [k for k, tomb in self._tombstones.items() if tomb.at < t - self.tombstone_seconds]:
            del self._tombstones[k]
        return n
