"""SQLite store: one file, WAL, group commit.

All SQL runs on one thread that owns the connection. Writes queue up while a commit is in flight
and go together in the next transaction, in the order they were queued, so many sessions' writes
share one fsync. This process is the file's only writer.

Durability: `sync` returns from put() after the transaction holding the write committed with
synchronous=FULL; `async` returns at once and the writer commits within `async_window` seconds
(write-behind; a crash loses at most that window, plus the commit in flight). Creates, deletes and
sweeps always wait for their commit.

What the process holds (`self.writes`, a WriteQueue: service/store/write_queue.py, where its rules
are written as `check()`), newest first:

- pending records: acknowledged by an `async` put and not yet committed, pinned until their
  newest write commits, at most `max_pending_writes` sessions (a put waits for room: backpressure,
  never loss). Every read and every compare-and-set consults them before the cache and the disk.
- the cache: clean (committed) records, an LRU bounded by count (`cache_size`) and by bytes
  (`cache_bytes`); evicting one only costs a read.

When a commit fails because the store is (for now) unable to write (read-only, disk full, I/O
error), the batch is rolled back: waiting writers get UNAVAILABLE, and acknowledged write-behinds
are kept and retried, their sessions fenced (every call on them answers UNAVAILABLE) until they are
stored; meanwhile `async` puts wait for their commit like `sync` ones. An acknowledged write that
can never be stored fences its session for the life of the process: never an older state served.

Session limits are checked inside the create's transaction against counters that triggers keep
(`session_counts`, `session_total`): exact under any concurrency, O(1) at any size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar, assert_never

import numpy as np

from service.engine.threads import name_this_thread
from service.errors import AlreadyExists, SessionExpired, SessionNotFound, StoreConflict, Unavailable
from service.store.base import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_CAPACITY,
    DEFAULT_MAX_PENDING_WRITES,
    DEFAULT_TOMBSTONE_SECONDS,
    Clock,
    SessionRecord,
    SessionSummary,
    Store,
    fmt_time,
    server_limit,
    settled,
    tenant_limit,
)
from service.store.record import (
    SQLITE_COLUMNS,
    SQLITE_FIXED,
    from_row,
    pack_rows,
    sqlite_column,
    sqlite_encoder,
    to_row,
)
from service.store.table import Loc, RowWrite
from service.store.write_queue import (
    Create,
    Delete,
    Expire,
    Failed,
    Outcome,
    Probe,
    Put,
    PutRows,
    Sweep,
    Write,
    WriteQueue,
    store_failed,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Key = tuple[str, str]

# The columns, the statements and the mapping to records all come from SessionRecord's declaration
# (service.store.record). A column added later is nullable: an existing file gets it with ALTER TABLE
# ADD COLUMN at open.
_NAMES = [name for name, _ in SQLITE_COLUMNS]
_SUMMARY = [(f.name, sqlite_column(f.name)) for f in fields(SessionSummary)]  # ListSessions' columns
_SELECT = f"SELECT {', '.join(f'[{n}]' for n in _NAMES)} FROM sessions WHERE tenant=:tenant AND id=:id"
_INSERT = (f"INSERT INTO sessions ({', '.join(f'[{n}]' for n in _NAMES)}) "
           f"VALUES ({', '.join(f':{n}' for n in _NAMES)})")
# A put's compare-and-set: the offset it read. A file shared by workers adds the session's creation time, so
# that a write from a worker's cached row (a hint) never lands on a session another worker deleted and
# created again since, at the same offset; a process that is the file's only writer holds no such row.
_CREATED = sqlite_column("created_at")
_UPDATE = (f"UPDATE sessions SET {', '.join(f'[{n}]=:{n}' for n in _NAMES if n not in SQLITE_FIXED)} "
           "WHERE tenant=:tenant AND id=:id AND [offset]=:prev_offset")
_UPDATE_SHARED = f"{_UPDATE} AND [{_CREATED}]=:{_CREATED}"
# A row round's write (PutRows): what a chunk changes, by compare-and-set as _UPDATE's; the columns a create
# fixes are left alone. Every other column must be here: a field added to SessionRecord fails this at import.
_ROW_SET = ("version", "offset", "updated_at", "ttl", "expires_at", "state", "last_digest", "last_start",
            "last_logits", "last_prev_state", "last_request")
assert {sqlite_column(n) for n in _ROW_SET} | set(SQLITE_FIXED) == set(_NAMES), "a column the row write leaves out"
_UPDATE_ROW = (f"UPDATE sessions SET {', '.join(f'[{sqlite_column(n)}]=?' for n in _ROW_SET)} "
               "WHERE tenant=? AND id=? AND [offset]=?")
_UPDATE_ROW_SHARED = f"{_UPDATE_ROW} AND [{_CREATED}]=?"
_PACK_LOGITS, _PACK_PREV = (sqlite_encoder(n) for n in ("last_logits", "last_prev_state"))
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS sessions (
    {", ".join(f"[{n}] {t}" for n, t in SQLITE_COLUMNS)}, PRIMARY KEY (tenant, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_expires ON sessions (expires);
CREATE INDEX IF NOT EXISTS sessions_model ON sessions (model, version);
CREATE TABLE IF NOT EXISTS tombstones (
    tenant TEXT NOT NULL, id TEXT NOT NULL, at REAL NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (tenant, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS session_counts (tenant TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS session_total (id INTEGER PRIMARY KEY CHECK (id = 0), n INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS sessions_counted AFTER INSERT ON sessions BEGIN
    INSERT INTO session_counts VALUES (NEW.tenant, 1) ON CONFLICT (tenant) DO UPDATE SET n = n + 1;
    UPDATE session_total SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS sessions_uncounted AFTER DELETE ON sessions BEGIN
    UPDATE session_counts SET n = n - 1 WHERE tenant = OLD.tenant;
    UPDATE session_total SET n = n - 1;
END;
"""
_EXPIRE_AT_A_TIME = 1000  # expired rows a create at a limit removes to make room (the sweep takes the rest)
_SWEEP_AT_A_TIME = 5000  # expired rows one sweep transaction removes: other writes go between them


def _key(key: Key) -> dict[str, str]:
    return {"tenant": key[0], "id": key[1]}


def _expired(session_id: str, at: float) -> SessionExpired:
    return SessionExpired(f"session {session_id!r} expired at {fmt_time(at)} after its idle TTL")


def _row_params(tenant: str, w: RowWrite, shared: bool) -> list[tuple]:
    """Each row's UPDATE parameters (_UPDATE_ROW's order, or _UPDATE_ROW_SHARED's): the record the row round's
    write makes, as the record round would store it (`RowWrite.outputs`), its arrays encoded a column at a time."""
    version, n = w.block.version, len(w.session_ids)
    states = pack_rows(w.states)
    finals = pack_rows([w.final[None]]) if n else []  # row j: final[j : j + 1], as a record keeps it
    kept = w.kept or [None] * n
    out = []
    for j, (sid, start, steps, ttl, complete, created) in enumerate(zip(
            w.session_ids, w.offsets.tolist(), w.steps.tolist(), w.ttl.tolist(), w.complete.tolist(),
            w.created.tolist())):
        k = kept[j]
        logits = finals[j] if k is None else _PACK_LOGITS(k)
        prev = None if complete else _PACK_PREV([s[:, j] for s in w.before])
        out.append((version, start + steps, w.t, ttl, w.t + ttl, states[j], w.digests[j], start, logits, prev, "",
                    tenant, sid, start, *((created,) if shared else ())))
    return out


class SqliteStore(Store):
    def __init__(self, path: Path, *, durability: str = "sync", cache_size: int = DEFAULT_CAPACITY,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, max_pending_writes: int = DEFAULT_MAX_PENDING_WRITES,
                 async_window: float = 0.05, tombstone_seconds: float = DEFAULT_TOMBSTONE_SECONDS,
                 clock: Clock = time.time, max_pages: int = 0, close_timeout: float = 30.0,
                 shared: bool = False) -> None:
        self.path, self.durability, self.async_window = path, durability, async_window
        # shared: other processes write the file too (--workers), so what this one holds is a hint: `fresh`
        # reads the file, and the file's compare-and-set decides every write
        self.shared = self.hints = shared
        self.tombstone_seconds, self.clock = tombstone_seconds, clock
        self.max_pages = max_pages  # PRAGMA max_page_count (0: SQLite's default); a real limit, for tests
        self.close_timeout = close_timeout
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite", initializer=name_this_thread,
                                        initargs=("recur-sqlite",))
        self._conn: sqlite3.Connection | None = None
        # what the process holds between the callers and the file (service/store/write_queue.py)
        self.writes = WriteQueue(cache_size=cache_size, cache_bytes=cache_bytes, max_pending=max_pending_writes,
                                 on_commit=self._committed)
        self._wake = asyncio.Event()
        self._rush = asyncio.Event()  # someone waits: commit without waiting out the window
        self._committed_event = asyncio.Event()  # set and replaced after each batch
        self._writer: asyncio.Task | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.commits = 0  # transactions committed, for group-commit accounting

    def _committed(self, writes: int) -> None:
        self.commits += 1
        self.events.group_commit(writes)

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
        if self.max_pages:
            conn.execute(f"PRAGMA max_page_count={int(self.max_pages)}")
        conn.executescript(_SCHEMA)
        have = {r["name"] for r in conn.execute("PRAGMA table_info(sessions)")}
        for name, decl in SQLITE_COLUMNS:
            if name not in have:  # a file written before this column existed
                conn.execute(f"ALTER TABLE sessions ADD COLUMN [{name}] {decl}")
        if conn.execute("SELECT n FROM session_total").fetchone() is None:  # a new file, or one from before counters
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM session_counts")
            conn.execute("INSERT INTO session_counts SELECT tenant, count(*) FROM sessions GROUP BY tenant")
            conn.execute("INSERT INTO session_total VALUES (0, (SELECT count(*) FROM sessions))")
            conn.execute("COMMIT")
        self._conn = conn

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)
        except sqlite3.Error as e:
            log.error("sqlite session store: %s: %s", e.__class__.__name__, e)
            raise store_failed(e.__class__.__name__) from e

    # -- what the process knows ----------------------------------------------------------------
    async def _current(self, key: Key) -> SessionRecord:
        """The newest acknowledged record of a session (which may have expired by now); raises when
        it is fenced, expired into a tombstone, or does not exist."""
        q = self.writes
        while True:
            q.check_fence(key)
            unsettled = q.unsettled(key)
            if unsettled is not None:
                await asyncio.wait([unsettled])  # a create, delete or sync put in flight: its outcome decides
                continue
            expired_at = q.expiring(key)
            if expired_at is not None:
                raise _expired(key[1], expired_at)
            rec = q.acknowledged(key)
            if rec is not None:
                return rec
            row, tomb = await self._run(self._select, key)
            if q.touched(key):
                continue  # written while we read: look again
            if row is None:
                if tomb is not None:
                    raise _expired(key[1], tomb["at"])
                raise SessionNotFound(f"session {key[1]!r} does not exist")
            rec = from_row(row)
            q.remember(rec)
            return rec

    # -- reads ---------------------------------------------------------------------------------
    def _select(self, key: Key) -> tuple[sqlite3.Row | None, sqlite3.Row | None]:
        assert self._conn is not None
        row = self._conn.execute(_SELECT, _key(key)).fetchone()
        tomb = None
        if row is None:
            tomb = self._conn.execute("SELECT at FROM tombstones WHERE tenant=:tenant AND id=:id", _key(key)).fetchone()
        return row, tomb

    def _expire(self, key: Key, at: float) -> SessionExpired:
        """The record has expired (at `at`): remove this one (behind any write queued for it); sweeping
        the rest is the sweeper's job."""
        self.writes.forget(key)
        self._enqueue(Expire(key, at=at))
        return _expired(key[1], at)

    async def fresh(self, tenant: str, session_id: str) -> SessionRecord:
        if self.shared:
            self.writes.forget((tenant, session_id))  # a clean cached record only: sync writes leave none pending
        return await self.get(tenant, session_id)

    async def get(self, tenant: str, session_id: str) -> SessionRecord:
        key = (tenant, session_id)
        rec = await self._current(key)
        if rec.expires_at <= self.clock():
            raise self._expire(key, rec.expires_at)
        return rec

    # -- writes --------------------------------------------------------------------------------
    def _enqueue(self, write: Write) -> None:
        self.writes.enqueue(write)
        self._wake_writer(rush=write.future is not None)

    def _wake_writer(self, rush: bool) -> None:
        if rush:
            self._rush.set()
        self._idle.clear()
        self._wake.set()

    async def _submit(self, write: Write) -> None:
        """Queue a write and wait for its commit (even if the caller is cancelled meanwhile)."""
        write.future = asyncio.get_running_loop().create_future()
        self._enqueue(write)
        await settled(write.future)

    async def create(self, record: SessionRecord, *, max_sessions: int = 0, max_tenant_sessions: int = 0) -> None:
        key = (record.tenant, record.session_id)
        self.writes.check_fence(key)
        if self.shared:
            self.writes.forget(key)  # another process may have deleted it: the file's insert decides
        known = self.writes.known(key)
        if known is not None and known.expires_at > self.clock():
            raise AlreadyExists(f"session {record.session_id!r} already exists")
        # creation is always durable; the limits are checked in its transaction (atomic)
        await self._submit(Create(key, record, at=self.clock(), limits=(max_sessions, max_tenant_sessions)))

    def _check_put(self, key: Key, current: SessionRecord, record: SessionRecord, prev_offset: int) -> None:
        if current.expires_at <= self.clock():
            raise self._expire(key, current.expires_at)
        if current.offset != prev_offset:
            raise StoreConflict(f"session {record.session_id!r} is at offset {current.offset}", current.offset)

    async def put(self, record: SessionRecord, prev_offset: int) -> None:
        key = (record.tenant, record.session_id)
        q = self.writes
        if self.durability == "sync" or q.failure is not None:
            # Reply after the commit. While the store fails, write-behind waits for its commit too:
            # each such write probes the store, and nothing is acknowledged that might not be stored.
            q.check_fence(key)
            known = q.known(key)
            if known is not None:
                self._check_put(key, known, record, prev_offset)
            await self._submit(Put(key, record, prev_offset, at=self.clock()))
            return
        while True:
            current = await self._current(key)
            self._check_put(key, current, record, prev_offset)
            if q.has_room(key):
                break
            self._rush.set()  # backpressure: wait for the writer to commit, then look again
            await self._next_commit()
            if q.failure is not None:
                return await self.put(record, prev_offset)
        # From the check to the queue without an await: compare-and-set against what is acknowledged.
        if q.acknowledge(record, prev_offset, at=self.clock()) is not None:
            self._wake_writer(rush=False)

    async def _next_commit(self) -> None:
        await self._committed_event.wait()

    async def put_many(self, writes: list[tuple[SessionRecord, int]]) -> list[Exception | None]:
        """All writes go into the queue at once, so they share one transaction (and one fsync)."""
        if self.durability != "sync":
            return await super().put_many(writes)
        results: list[Exception | None] = [None] * len(writes)
        waiting: list[tuple[int, asyncio.Future]] = []
        loop = asyncio.get_running_loop()
        for k, (record, prev_offset) in enumerate(writes):
            key = (record.tenant, record.session_id)
            try:
                self.writes.check_fence(key)
                known = self.writes.known(key)
                if known is not None:
                    self._check_put(key, known, record, prev_offset)
            except (StoreConflict, SessionExpired, Unavailable) as e:
                results[k] = e
                continue
            future = loop.create_future()
            self._enqueue(Put(key, record, prev_offset, at=self.clock(), future=future))
            waiting.append((k, future))
        if waiting:
            outcomes = await settled(asyncio.gather(*(f for _, f in waiting), return_exceptions=True))
            for (k, _), outcome in zip(waiting, outcomes):
                results[k] = outcome if isinstance(outcome, Exception) else None
        return results

    # -- the row round (sync durability) -------------------------------------------------------------------
    async def read_rows(self, tenant: str, session_ids: list[str]) -> list[Loc | Exception] | None:
        """The sessions' cached rows when every one is cached, clean and live; else None (the record round
        reads them: a miss, an expiry or a refusal is decided there, in one place). Shared (--workers), the
        rows are hints: a write the file's compare-and-set refuses runs again from a fresh read."""
        if self.durability != "sync" or self.writes.failure is not None:
            return None
        t = self.clock()
        out: list[Loc | Exception] = []
        for session_id in session_ids:
            loc = self.writes.clean_row((tenant, session_id))
            if loc is None or loc[0].expires(loc[1]) <= t:
                return None
            out.append(loc)
        return out

    async def write_rows(self, tenant: str, w: RowWrite) -> list[Exception | None]:
        """The rows' new records in one transaction, each by compare-and-set (offset and creation time) in the
        file; the cached rows take them once it commits."""
        b, t = w.block, self.clock()
        out: list[Exception | None] = [None] * len(w.rows)
        held = ~b.stale(w.rows, w.gens, w.offsets)
        expired = held & (b.expires(w.rows) <= t)
        at = np.arange(len(w.rows))
        if expired.any():  # expired while it ran: as the record round's put refuses it
            for j in np.flatnonzero(expired).tolist():
                out[j] = self._expire((tenant, w.session_ids[j]), float(b.expires(int(w.rows[j]))))
            at, w = at[~expired], w.only(~expired)
        if len(at):
            put = PutRows([(tenant, sid) for sid in w.session_ids], w, at=t)
            try:
                await self._submit(put)
            except Unavailable as e:
                put.results = [e] * len(at)
            for j, result in zip(at.tolist(), put.results):
                out[j] = result
        return out

    async def delete(self, tenant: str, session_id: str) -> None:
        key = (tenant, session_id)
        await self.get(tenant, session_id)  # fenced, NOT_FOUND or expired before anything changes
        self.writes.forget(key)
        await self._submit(Delete(key, at=self.clock()))

    # -- the writer's thread -------------------------------------------------------------------
    def _expire_rows(self, c: sqlite3.Connection, t: float, tenant: str | None, limit: int = -1) -> int:
        """Remove sessions expired at `t` (of `tenant`, or all), leaving tombstones; triggers keep counts."""
        of_tenant = "" if tenant is None else " AND tenant = :tenant"
        due = f"SELECT tenant, id FROM sessions WHERE expires <= :t{of_tenant} ORDER BY expires LIMIT :limit"
        args = {"t": t, "tenant": tenant, "limit": limit}
        c.execute("INSERT OR REPLACE INTO tombstones SELECT tenant, id, expires, 'expired' FROM sessions "
                  f"WHERE (tenant, id) IN ({due})", args)
        return c.execute(f"DELETE FROM sessions WHERE (tenant, id) IN ({due})", args).rowcount

    @staticmethod
    def _counted(c: sqlite3.Connection, tenant: str | None) -> int:
        row = (c.execute("SELECT n FROM session_total").fetchone() if tenant is None else
               c.execute("SELECT n FROM session_counts WHERE tenant = ?", (tenant,)).fetchone())
        return 0 if row is None else int(row[0])

    def _room(self, c: sqlite3.Connection, w: Create) -> Exception | None:
        """Inside the create's transaction: is there room under its limits? Counters include sessions
        expired but not yet swept, so at a limit the expired ones go first."""
        max_sessions, max_tenant = w.limits
        for limit, tenant in ((max_tenant, w.key[0]), (max_sessions, None)):
            if limit and self._counted(c, tenant) >= limit:
                self._expire_rows(c, w.at, tenant, _EXPIRE_AT_A_TIME)
                if self._counted(c, tenant) >= limit:
                    return server_limit(limit) if tenant is None else tenant_limit(tenant, limit)
        return None

    def _create(self, c: sqlite3.Connection, w: Create) -> Exception | None:
        key = _key(w.key)
        existing = c.execute("SELECT expires FROM sessions WHERE tenant=:tenant AND id=:id", key).fetchone()
        if existing is not None and existing["expires"] > w.at:
            return AlreadyExists(f"session {w.key[1]!r} already exists")
        if existing is not None:  # expired, not yet swept: expire it now (whether or not this create fits)
            c.execute("DELETE FROM sessions WHERE tenant=:tenant AND id=:id", key)
            c.execute("INSERT OR REPLACE INTO tombstones VALUES (:tenant, :id, :at, 'expired')",
                      {**key, "at": existing["expires"]})
        refused = self._room(c, w)
        if refused is not None:
            return refused
        c.execute("DELETE FROM tombstones WHERE tenant=:tenant AND id=:id", key)
        c.execute(_INSERT, to_row(w.record))
        return None

    def _put(self, c: sqlite3.Connection, w: Put) -> Exception | None:
        update = _UPDATE_SHARED if self.shared else _UPDATE
        if c.execute(update, {**to_row(w.record), "prev_offset": w.prev_offset}).rowcount == 1:
            return None
        return SqliteStore._refused(c, w.key)

    def _put_rows(self, c: sqlite3.Connection, w: PutRows) -> list[Exception | None]:
        update = _UPDATE_ROW_SHARED if self.shared else _UPDATE_ROW
        return [None if c.execute(update, params).rowcount == 1 else SqliteStore._refused(c, key)
                for key, params in zip(w.keys, _row_params(w.keys[0][0], w.write, self.shared))]

    @staticmethod
    def _refused(c: sqlite3.Connection, k: Key) -> Exception:
        """Why a compare-and-set found no row at its offset."""
        key = _key(k)
        row = c.execute("SELECT [offset] FROM sessions WHERE tenant=:tenant AND id=:id", key).fetchone()
        if row is not None:
            return StoreConflict(f"session {k[1]!r} is at offset {row['offset']}", row["offset"])
        tomb = c.execute("SELECT at FROM tombstones WHERE tenant=:tenant AND id=:id", key).fetchone()
        if tomb is not None:
            return _expired(k[1], tomb["at"])
        return SessionNotFound(f"session {k[1]!r} does not exist")

    def _apply_one(self, c: sqlite3.Connection, w: Write) -> Exception | None:
        match w:
            case Create():
                return self._create(c, w)
            case Put():
                return self._put(c, w)
            case PutRows():
                w.results = self._put_rows(c, w)
            case Expire():  # only if no later write has renewed it
                key = _key(w.key)
                if c.execute("DELETE FROM sessions WHERE tenant=:tenant AND id=:id AND expires <= :at",
                             {**key, "at": w.at}).rowcount:
                    c.execute("INSERT OR REPLACE INTO tombstones VALUES (:tenant, :id, :at, 'expired')",
                              {**key, "at": w.at})
            case Delete():
                c.execute("DELETE FROM sessions WHERE tenant=:tenant AND id=:id", _key(w.key))
            case Sweep():
                w.result = self._expire_rows(c, w.at, None, _SWEEP_AT_A_TIME)
                if w.first:
                    c.execute("DELETE FROM tombstones WHERE at < ?", (w.at - self.tombstone_seconds,))
            case Probe():  # can the store write? (a page rewritten, nothing changed)
                c.execute("UPDATE session_total SET n = n")
            case _:
                assert_never(w)
        return None

    def _apply(self, batch: list[Write]) -> list[Exception | None]:
        """One transaction for the whole batch, in queue order; one result per write."""
        assert self._conn is not None
        c = self._conn
        try:
            c.execute("BEGIN IMMEDIATE")
            results = [self._apply_one(c, w) for w in batch]
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                try:
                    c.execute("ROLLBACK")
                except sqlite3.Error:
                    log.warning("sqlite session store: rollback failed", exc_info=True)
            raise
        return results

    # -- the writer ----------------------------------------------------------------------------
    async def _write_loop(self) -> None:
        backoff = 0.0
        while True:
            if self.writes.empty():
                self._idle.set()
                await self._wake.wait()
                self._wake.clear()
                continue
            if backoff:
                await asyncio.sleep(backoff)  # the store failed: retry after a pause
            elif self.durability == "async" and not self._rush.is_set():
                with contextlib.suppress(TimeoutError):  # gather more writes behind, unless someone waits
                    await asyncio.wait_for(self._rush.wait(), self.async_window)
            self._rush.clear()
            retry, new = self.writes.take()
            await self.writes.commit(retry, new, self._attempt)
            backoff = min(1.0, max(0.05, 2 * backoff)) if self.writes.retrying else 0.0
            event, self._committed_event = self._committed_event, asyncio.Event()
            event.set()

    async def _attempt(self, batch: list[Write]) -> Outcome:
        """Apply a batch in one transaction: a result per write, or why none was applied (an
        OperationalError, such as a full disk or a read-only file, may pass: its write-behinds are retried)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._exec, self._apply, batch)
        except Exception as e:
            return Failed(e, transient=isinstance(e, sqlite3.OperationalError))

    def write_lag(self) -> float:
        """Seconds the oldest acknowledged write-behind still queued has waited (0: none); callable
        from another thread (a metrics scrape)."""
        return self.writes.write_lag(self.clock())

    async def flush(self) -> None:
        """Wait until every accepted write is stored (while the store fails, until it recovers)."""
        while not self.writes.empty() or not self._idle.is_set():
            self._rush.set()
            self._wake.set()
            await self._idle.wait()

    # -- counts, health, sweep, close --------------------------------------------------------
    def _count_sync(self, tenant: str | None, t: float, keys: bool) -> tuple[int, list[Key], int]:
        assert self._conn is not None
        c = self._conn
        where = "expires <= ?" + ("" if tenant is None else " AND tenant = ?")
        args = (t,) if tenant is None else (t, tenant)
        c.execute("BEGIN")  # one snapshot for the counter and the expired rows
        try:
            n = self._counted(c, tenant)
            if keys:
                expired = [(r[0], r[1]) for r in c.execute(f"SELECT tenant, id FROM sessions WHERE {where}", args)]
                return n, expired, len(expired)
            return n, [], int(c.execute(f"SELECT count(*) FROM sessions WHERE {where}", args).fetchone()[0])
        finally:
            c.execute("COMMIT")

    async def count(self, tenant: str | None = None) -> int:
        """Live sessions: the counter, less the rows expired but not yet swept (unless an acknowledged
        write not yet stored renewed them)."""
        t = self.clock()
        n, expired, n_expired = await self._run(self._count_sync, tenant, t, self.writes.pending_count > 0)
        renewed = sum(1 for k in expired if (r := self.writes.pending_record(k)) is not None and r.expires_at > t)
        return n - n_expired + renewed

    def _count_by_model_sync(self, t: float, tenant: str | None) -> dict[tuple[str, int], int]:
        assert self._conn is not None
        if tenant is None:
            rows = self._conn.execute("SELECT model, version, count(*) FROM sessions WHERE expires > ? "
                                      "GROUP BY model, version", (t,))
        else:
            rows = self._conn.execute("SELECT model, version, count(*) FROM sessions WHERE tenant = ? AND expires > ? "
                                      "GROUP BY model, version", (tenant, t))
        return {(r[0], int(r[1])): int(r[2]) for r in rows}

    async def count_by_model(self, tenant: str | None = None) -> dict[tuple[str, int], int] | None:
        """From the file (one GROUP BY on the (model, version) index): writes not yet committed are left out."""
        return await self._run(self._count_by_model_sync, self.clock(), tenant)

    def _list_sync(self, tenant: str, model: str, after_id: str, limit: int, t: float) -> list[sqlite3.Row]:
        assert self._conn is not None
        of_model = " AND model = :model" if model else ""
        return self._conn.execute(  # the primary key (tenant, id) orders and bounds the scan
            f"SELECT {', '.join(f'[{c}]' for _, c in _SUMMARY)} FROM sessions "
            f"WHERE tenant = :tenant AND id > :after AND expires > :t{of_model} ORDER BY id LIMIT :limit",
            {"tenant": tenant, "after": after_id, "t": t, "model": model, "limit": limit}).fetchall()

    async def list_sessions(self, tenant: str, model: str = "", after_id: str = "",
                            limit: int = 100) -> list[SessionSummary]:
        """Committed rows, each overlaid by its acknowledged write not yet committed (write-behind)."""
        t = self.clock()
        rows = await self._run(self._list_sync, tenant, model, after_id, limit, t)
        out = []
        for row in rows:
            pending = self.writes.pending_record((tenant, row["id"]))
            out.append(SessionSummary.of(pending) if pending is not None else
                       SessionSummary(**{name: row[column] for name, column in _SUMMARY}))
        return out

    def _read_probe(self) -> None:
        assert self._conn is not None
        self._conn.execute("SELECT n FROM session_total").fetchone()

    async def ping(self) -> None:
        failure = self.writes.failure
        if failure is not None:
            if self.writes.retrying:
                raise Unavailable(f"the sqlite session store is failing ({failure}): {self.writes.retrying} "
                                  "acknowledged writes wait to be stored and are retried")
            await self._submit(Probe(at=self.clock()))  # raises while it still fails
            return
        await self._run(self._read_probe)

    async def sweep(self) -> int:
        """Expire what is due at `clock()`, a few thousand rows a transaction (writes go between)."""
        t, n = self.clock(), 0
        while True:
            w = Sweep(at=t, first=n == 0)
            await self._submit(w)
            n += w.result
            if w.result < _SWEEP_AT_A_TIME:
                return n

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.flush(), self.close_timeout)
        except TimeoutError:
            log.error("closing the sqlite session store with %d acknowledged writes not stored: the store kept "
                      "failing (%s) for %.0f s", self.writes.pending_count, self.writes.failure, self.close_timeout)
        if self._writer is not None:
            self._writer.cancel()
        if self._conn is not None:
            await self._run(self._conn.close)
        self._exec.shutdown(wait=True)
