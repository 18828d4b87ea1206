"""SQLite store: one file, WAL, group commit.

All SQL runs on one thread that owns the connection. Writes queue up while a
commit is in flight and go together in the next transaction, so many sessions'
writes share one fsync. A write-through cache in front keeps reads off the disk:
this process is the file's only writer.

Durability: `sync` returns from put() after the transaction holding the write
committed with synchronous=FULL; `async` returns at once and the writer commits
within `async_window` seconds (write-behind; a crash loses at most that window).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.errors import AlreadyExists, SessionExpired, SessionNotFound, StoreConflict, Unavailable
from service.store.base import SessionRecord, Store, fmt_time, now, pack_arrays, settled, unpack_arrays

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    tenant TEXT NOT NULL, id TEXT NOT NULL, model TEXT NOT NULL, version INTEGER NOT NULL,
    "offset" INTEGER NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, ttl REAL NOT NULL,
    expires REAL NOT NULL, state BLOB NOT NULL, last_digest BLOB NOT NULL, last_start INTEGER NOT NULL,
    last_logits BLOB, PRIMARY KEY (tenant, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_expires ON sessions (expires);
CREATE TABLE IF NOT EXISTS tombstones (
    tenant TEXT NOT NULL, id TEXT NOT NULL, at REAL NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (tenant, id)) WITHOUT ROWID;
"""
_COLUMNS = ('tenant, id, model, version, "offset", created, updated, ttl, expires, state, last_digest, '
            "last_start, last_logits")


def _row(r: SessionRecord) -> tuple:
    logits = None if r.last_logits is None else pack_arrays([r.last_logits])
    return (r.tenant, r.session_id, r.model, r.version, r.offset, r.created_at, r.updated_at, r.ttl, r.expires_at,
            pack_arrays(r.state), r.last_digest, r.last_start, logits)


def _record(row: tuple) -> SessionRecord:
    logits: np.ndarray | None = None if row[12] is None else unpack_arrays(row[12])[0]
    return SessionRecord(tenant=row[0], session_id=row[1], model=row[2], version=row[3], offset=row[4],
                         created_at=row[5], updated_at=row[6], ttl=row[7], state=unpack_arrays(row[9]),
                         last_digest=row[10], last_start=row[11], last_logits=logits)


@dataclass
class _Write:
    kind: str  # "create", "put", "delete"
    record: SessionRecord | None
    key: tuple[str, str]
    prev_offset: int = -1
    future: asyncio.Future | None = field(default=None)


class SqliteStore(Store):
    def __init__(self, path: Path, *, durability: str = "sync", cache_size: int = 100_000,
                 async_window: float = 0.05, tombstone_seconds: float = 2 * 86400) -> None:
        self.path, self.durability, self.async_window = path, durability, async_window
        self.tombstone_seconds = tombstone_seconds
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None
        self._cache: OrderedDict[tuple[str, str], SessionRecord] = OrderedDict()
        self._cache_size = cache_size
        self._queue: list[_Write] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.commits = 0  # transactions committed, for group-commit accounting

    async def open(self) -> SqliteStore:
        await self._run(self._open_sync)
        self._writer = asyncio.create_task(self._write_loop(), name="sqlite-writer")
        return self

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'sync' else 'NORMAL'}")
        conn.executescript(_SCHEMA)
        self._conn = conn

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        try:
            return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)
        except sqlite3.Error as e:
            log.exception("sqlite store error")
            raise Unavailable(f"the session store ({self.path}) failed: {e.__class__.__name__}") from e

    # -- reads ---------------------------------------------------------------
    def _select(self, key: tuple[str, str]) -> tuple[tuple | None, tuple | None]:
        assert self._conn is not None
        row = self._conn.execute(f"SELECT {_COLUMNS} FROM sessions WHERE tenant=? AND id=?", key).fetchone()
        tomb = None
        if row is None:
            tomb = self._conn.execute("SELECT at, reason FROM tombstones WHERE tenant=? AND id=?", key).fetchone()
        return row, tomb

    def _remember(self, rec: SessionRecord) -> None:
        key = (rec.tenant, rec.session_id)
        self._cache[key] = rec
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def get(self, tenant: str, session_id: str) -> SessionRecord:
        key = (tenant, session_id)
        rec = self._cache.get(key)
        if rec is None:
            row, tomb = await self._run(self._select, key)
            if row is None:
                if tomb is not None:
                    raise SessionExpired(f"session {session_id!r} expired at {fmt_time(tomb[0])} after its idle TTL")
                raise SessionNotFound(f"session {session_id!r} does not exist")
            rec = _record(row)
            self._remember(rec)
        else:
            self._cache.move_to_end(key)
        if rec.expires_at <= now():
            self._cache.pop(key, None)
            await self.sweep()
            raise SessionExpired(f"session {session_id!r} expired at {fmt_time(rec.expires_at)} after its idle TTL")
        return rec

    # -- writes --------------------------------------------------------------
    async def _submit(self, write: _Write, wait: bool) -> None:
        if wait:
            write.future = asyncio.get_running_loop().create_future()
        self._queue.append(write)
        self._idle.clear()
        self._wake.set()
        if write.future is not None:
            await settled(write.future)

    async def create(self, record: SessionRecord) -> None:
        key = (record.tenant, record.session_id)
        cached = self._cache.get(key)
        if cached is not None and cached.expires_at > now():
            raise AlreadyExists(f"session {record.session_id!r} already exists")
        await self._submit(_Write("create", record, key), wait=True)  # creation is always durable

    async def put(self, record: SessionRecord, prev_offset: int) -> None:
        key = (record.tenant, record.session_id)
        cached = self._cache.get(key)
        if cached is not None and cached.offset != prev_offset:
            raise StoreConflict(f"session {record.session_id!r} is at offset {cached.offset}", cached.offset)
        if self.durability == "sync":
            await self._submit(_Write("put", record, key, prev_offset), wait=True)
        else:
            self._remember(record)
            await self._submit(_Write("put", record, key, prev_offset), wait=False)

    async def put_many(self, writes: list[tuple[SessionRecord, int]]) -> list[Exception | None]:
        """All writes go into the queue at once, so they share one transaction (and one fsync)."""
        if self.durability != "sync":
            return await super().put_many(writes)
        results: list[Exception | None] = [None] * len(writes)
        waiting: list[tuple[int, asyncio.Future]] = []
        loop = asyncio.get_running_loop()
        for k, (record, prev_offset) in enumerate(writes):
            key = (record.tenant, record.session_id)
            cached = self._cache.get(key)
            if cached is not None and cached.offset != prev_offset:
                results[k] = StoreConflict(f"session {record.session_id!r} is at offset {cached.offset}", cached.offset)
                continue
            write = _Write("put", record, key, prev_offset, loop.create_future())
            self._queue.append(write)
            waiting.append((k, write.future))  # type: ignore[arg-type]
        if waiting:
            self._idle.clear()
            self._wake.set()
            outcomes = await settled(asyncio.gather(*(f for _, f in waiting), return_exceptions=True))
            for (k, _), outcome in zip(waiting, outcomes):
                results[k] = outcome if isinstance(outcome, Exception) else None
        return results

    async def delete(self, tenant: str, session_id: str) -> None:
        key = (tenant, session_id)
        await self.get(tenant, session_id)  # NOT_FOUND / expired before anything changes
        self._cache.pop(key, None)
        await self._submit(_Write("delete", None, key), wait=True)

    def _apply(self, batch: list[_Write]) -> list[Exception | None]:
        """One transaction for the whole batch; one result per write."""
        assert self._conn is not None
        c = self._conn
        results: list[Exception | None] = []
        c.execute("BEGIN IMMEDIATE")
        try:
            for w in batch:
                if w.kind == "create":
                    existing = c.execute("SELECT expires FROM sessions WHERE tenant=? AND id=?", w.key).fetchone()
                    if existing is not None and existing[0] > now():
                        results.append(AlreadyExists(f"session {w.key[1]!r} already exists"))
                        continue
                    c.execute("DELETE FROM tombstones WHERE tenant=? AND id=?", w.key)
                    c.execute(f"INSERT OR REPLACE INTO sessions ({_COLUMNS}) VALUES ({','.join('?' * 13)})",
                              _row(w.record))  # type: ignore[arg-type]
                    results.append(None)
                elif w.kind == "put":
                    assert w.record is not None
                    row = _row(w.record)
                    cur = c.execute(
                        'UPDATE sessions SET "offset"=?, updated=?, ttl=?, expires=?, state=?, last_digest=?, '
                        'last_start=?, last_logits=? WHERE tenant=? AND id=? AND "offset"=?',
                        (*row[4:5], *row[6:13], *w.key, w.prev_offset),
                    )
                    if cur.rowcount == 1:
                        results.append(None)
                    else:
                        row = c.execute('SELECT "offset" FROM sessions WHERE tenant=? AND id=?', w.key).fetchone()
                        actual = None if row is None else row[0]
                        results.append(StoreConflict(f"session {w.key[1]!r} is at offset {actual}", actual))
                else:
                    c.execute("DELETE FROM sessions WHERE tenant=? AND id=?", w.key)
                    results.append(None)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        self.commits += 1
        return results

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.durability == "async" and not any(w.future for w in self._queue):
                await asyncio.sleep(self.async_window)  # gather more writes behind
            batch, self._queue = self._queue, []
            if not batch:
                self._idle.set()
                continue
            try:
                results: list[Exception | None] = await self._run(self._apply, batch)
            except Exception as e:  # the store failed: every write of the batch fails
                results = [e] * len(batch)
            for w, err in zip(batch, results):
                if err is None and w.record is not None and w.future is not None:
                    self._remember(w.record)  # here, not in put(): a cancelled caller must not skip it
                if err is not None:
                    self._cache.pop(w.key, None)  # never serve a state that was not stored
                    if w.future is None:
                        log.error("write-behind of session %s failed: %s", w.key[1], err)
                if w.future is not None and not w.future.done():
                    if err is None:
                        w.future.set_result(None)
                    else:
                        w.future.set_exception(err)
            if not self._queue:
                self._idle.set()

    async def flush(self) -> None:
        while self._queue or not self._idle.is_set():
            self._wake.set()
            await self._idle.wait()
            if self._queue:
                self._idle.clear()

    async def count(self) -> int:
        assert self._conn is not None
        return (await self._run(lambda: self._conn.execute("SELECT count(*) FROM sessions").fetchone()))[0]

    def _sweep_sync(self, t: float) -> int:
        assert self._conn is not None
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT OR REPLACE INTO tombstones SELECT tenant, id, expires, 'expired' FROM sessions "
                  "WHERE expires <= ?", (t,))
        n = c.execute("DELETE FROM sessions WHERE expires <= ?", (t,)).rowcount
        c.execute("DELETE FROM tombstones WHERE at < ?", (t - self.tombstone_seconds,))
        c.execute("COMMIT")
        return n

    async def sweep(self, now_: float | None = None) -> int:
        t = now() if now_ is None else now_
        await self.flush()
        for key in [k for k, r in self._cache.items() if r.expires_at <= t]:
            del self._cache[key]
        return await self._run(self._sweep_sync, t)

    async def close(self) -> None:
        await self.flush()
        if self._writer is not None:
            self._writer.cancel()
        if self._conn is not None:
            await self._run(self._conn.close)
        self._exec.shutdown(wait=True)
