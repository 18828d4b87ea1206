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
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.errors import AlreadyExists, SessionExpired, SessionNotFound, StoreConflict, Unavailable
from service.store.base import (
    DEFAULT_CAPACITY,
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

# One column list drives the schema, the statements and the mapping to records.
_SESSION_COLUMNS = (
    ("tenant", "TEXT NOT NULL"), ("id", "TEXT NOT NULL"), ("model", "TEXT NOT NULL"), ("version", "INTEGER NOT NULL"),
    ("offset", "INTEGER NOT NULL"), ("created", "REAL NOT NULL"), ("updated", "REAL NOT NULL"),
    ("ttl", "REAL NOT NULL"), ("expires", "REAL NOT NULL"), ("state", "BLOB NOT NULL"),
    ("last_digest", "BLOB NOT NULL"), ("last_start", "INTEGER NOT NULL"), ("last_logits", "BLOB"),
)
_NAMES = [name for name, _ in _SESSION_COLUMNS]
_FIXED = ("tenant", "id", "model", "version", "created")  # never change after creation
_SELECT = f"SELECT {', '.join(f'[{n}]' for n in _NAMES)} FROM sessions WHERE tenant=:tenant AND id=:id"
_INSERT = (f"INSERT OR REPLACE INTO sessions ({', '.join(f'[{n}]' for n in _NAMES)}) "
           f"VALUES ({', '.join(f':{n}' for n in _NAMES)})")
_UPDATE = (f"UPDATE sessions SET {', '.join(f'[{n}]=:{n}' for n in _NAMES if n not in _FIXED)} "
           "WHERE tenant=:tenant AND id=:id AND [offset]=:prev_offset")
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS sessions (
    {", ".join(f"[{n}] {t}" for n, t in _SESSION_COLUMNS)}, PRIMARY KEY (tenant, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_expires ON sessions (expires);
CREATE TABLE IF NOT EXISTS tombstones (
    tenant TEXT NOT NULL, id TEXT NOT NULL, at REAL NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (tenant, id)) WITHOUT ROWID;
"""


def _row(r: SessionRecord) -> dict[str, object]:
    logits = None if r.last_logits is None else pack_arrays([r.last_logits])
    return {"tenant": r.tenant, "id": r.session_id, "model": r.model, "version": r.version, "offset": r.offset,
            "created": r.created_at, "updated": r.updated_at, "ttl": r.ttl, "expires": r.expires_at,
            "state": pack_arrays(r.state), "last_digest": r.last_digest, "last_start": r.last_start,
            "last_logits": logits}


def _record(row: sqlite3.Row) -> SessionRecord:
    logits: np.ndarray | None = None if row["last_logits"] is None else unpack_arrays(row["last_logits"])[0]
    return SessionRecord(tenant=row["tenant"], session_id=row["id"], model=row["model"], version=row["version"],
                         offset=row["offset"], created_at=row["created"], updated_at=row["updated"], ttl=row["ttl"],
                         state=unpack_arrays(row["state"]), last_digest=row["last_digest"],
                         last_start=row["last_start"], last_logits=logits)


def _key(key: tuple[str, str]) -> dict[str, str]:
    return {"tenant": key[0], "id": key[1]}


@dataclass
class _Write:
    kind: str  # "create", "put", "delete", "expire"
    record: SessionRecord | None
    key: tuple[str, str]
    prev_offset: int = -1
    future: asyncio.Future | None = field(default=None)
    at: float = 0.0  # "expire": the time it expired at


class SqliteStore(Store):
    def __init__(self, path: Path, *, durability: str = "sync", cache_size: int = DEFAULT_CAPACITY,
                 async_window: float = 0.05, tombstone_seconds: float = DEFAULT_TOMBSTONE_SECONDS,
                 clock: Clock = time.time) -> None:
        self.path, self.durability, self.async_window = path, durability, async_window
        self.tombstone_seconds, self.clock = tombstone_seconds, clock
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
        conn.row_factory = sqlite3.Row
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
    def _select(self, key: tuple[str, str]) -> tuple[sqlite3.Row | None, sqlite3.Row | None]:
        assert self._conn is not None
        row = self._conn.execute(_SELECT, _key(key)).fetchone()
        tomb = None
        if row is None:
            tomb = self._conn.execute("SELECT at FROM tombstones WHERE tenant=:tenant AND id=:id", _key(key)).fetchone()
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
                    raise SessionExpired(
                        f"session {session_id!r} expired at {fmt_time(tomb['at'])} after its idle TTL")
                raise SessionNotFound(f"session {session_id!r} does not exist")
            rec = _record(row)
            self._remember(rec)
        else:
            self._cache.move_to_end(key)
        if rec.expires_at <= self.clock():
            # Expire this one record (behind any write queued for it); sweeping the rest is the sweeper's job.
            self._cache.pop(key, None)
            await self._submit(_Write("expire", None, key, at=rec.expires_at), wait=False)
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
        if cached is not None and cached.expires_at > self.clock():
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
            future = loop.create_future()
            self._queue.append(_Write("put", record, key, prev_offset, future))
            waiting.append((k, future))
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

    def _apply_one(self, c: sqlite3.Connection, w: _Write, t: float) -> Exception | None:
        key = _key(w.key)
        if w.kind == "create":
            assert w.record is not None
            existing = c.execute("SELECT expires FROM sessions WHERE tenant=:tenant AND id=:id", key).fetchone()
            if existing is not None and existing["expires"] > t:
                return AlreadyExists(f"session {w.key[1]!r} already exists")
            c.execute("DELETE FROM tombstones WHERE tenant=:tenant AND id=:id", key)
            c.execute(_INSERT, _row(w.record))
        elif w.kind == "put":
            assert w.record is not None
            if c.execute(_UPDATE, {**_row(w.record), "prev_offset": w.prev_offset}).rowcount != 1:
                row = c.execute("SELECT [offset] FROM sessions WHERE tenant=:tenant AND id=:id", key).fetchone()
                actual = None if row is None else row["offset"]
                return StoreConflict(f"session {w.key[1]!r} is at offset {actual}", actual)
        elif w.kind == "expire":  # only if no later write has renewed it
            at = {**key, "at": w.at}
            if c.execute("DELETE FROM sessions WHERE tenant=:tenant AND id=:id AND expires <= :at", at).rowcount:
                c.execute("INSERT OR REPLACE INTO tombstones VALUES (:tenant, :id, :at, 'expired')", at)
        else:
            c.execute("DELETE FROM sessions WHERE tenant=:tenant AND id=:id", key)
        return None

    def _apply(self, batch: list[_Write]) -> list[Exception | None]:
        """One transaction for the whole batch; one result per write."""
        assert self._conn is not None
        c, t = self._conn, self.clock()
        c.execute("BEGIN IMMEDIATE")
        try:
            results = [self._apply_one(c, w, t) for w in batch]
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

    async def sweep(self) -> int:
        t = self.clock()
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
