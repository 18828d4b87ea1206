"""In-memory store with an LRU bound: for tests and `--durability none`."""

from __future__ import annotations

import time
from collections import OrderedDict

from service.errors import AlreadyExists, SessionExpired, SessionNotFound, StoreConflict
from service.store.base import (
    DEFAULT_CAPACITY,
    DEFAULT_TOMBSTONE_SECONDS,
    Clock,
    SessionRecord,
    Store,
    Tombstone,
    fmt_time,
)


class MemoryStore(Store):
    """Holds at most `capacity` sessions; the least recently used beyond that are evicted."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, tombstone_seconds: float = DEFAULT_TOMBSTONE_SECONDS,
                 clock: Clock = time.time) -> None:
        self.capacity = capacity
        self.tombstone_seconds = tombstone_seconds
        self.clock = clock
        self._records: OrderedDict[tuple[str, str], SessionRecord] = OrderedDict()
        self._tombstones: dict[tuple[str, str], Tombstone] = {}

    def _missing(self, key: tuple[str, str]) -> Exception:
        t = self._tombstones.get(key)
        if t is None:
            return SessionNotFound(f"session {key[1]!r} does not exist")
        if t.reason == "evicted":
            return SessionExpired(
                f"session {key[1]!r} was evicted at {fmt_time(t.at)} (the memory store holds {self.capacity} sessions)"
            )
        return SessionExpired(f"session {key[1]!r} expired at {fmt_time(t.at)} after its idle TTL")

    async def get(self, tenant: str, session_id: str) -> SessionRecord:
        key = (tenant, session_id)
        rec = self._records.get(key)
        if rec is not None and rec.expires_at <= self.clock():
            self._expire(key, rec)
            rec = None
        if rec is None:
            raise self._missing(key)
        self._records.move_to_end(key)
        return rec

    def _expire(self, key: tuple[str, str], rec: SessionRecord) -> None:
        del self._records[key]
        self._tombstones[key] = Tombstone(key[0], key[1], rec.expires_at, "expired")

    async def create(self, record: SessionRecord) -> None:
        key = (record.tenant, record.session_id)
        existing = self._records.get(key)
        if existing is not None and existing.expires_at > self.clock():
            raise AlreadyExists(f"session {record.session_id!r} already exists")
        self._tombstones.pop(key, None)
        self._records[key] = record
        while len(self._records) > self.capacity:
            old_key, _ = self._records.popitem(last=False)
            self._tombstones[old_key] = Tombstone(old_key[0], old_key[1], self.clock(), "evicted")

    async def put(self, record: SessionRecord, prev_offset: int) -> None:
        key = (record.tenant, record.session_id)
        current = self._records.get(key)
        if current is None:
            raise self._missing(key)
        if current.offset != prev_offset:
            raise StoreConflict(f"session {record.session_id!r} is at offset {current.offset}", current.offset)
        self._records[key] = record
        self._records.move_to_end(key)

    async def delete(self, tenant: str, session_id: str) -> None:
        if self._records.pop((tenant, session_id), None) is None:
            raise self._missing((tenant, session_id))

    async def count(self) -> int:
        return len(self._records)

    async def sweep(self) -> int:
        t = self.clock()
        expired = [(k, r) for k, r in self._records.items() if r.expires_at <= t]
        for k, r in expired:
            self._expire(k, r)
        for k in [k for k, tomb in self._tombstones.items() if tomb.at < t - self.tombstone_seconds]:
            del self._tombstones[k]
        return len(expired)
