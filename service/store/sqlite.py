"""SQLite store: one file, WAL, group commit.

All SQL runs on one thread that owns the connection. Writes queue up while a commit is in flight
and go together in the next transaction, in the order they were queued, so many sessions' writes
share one fsync. This process is the file's only writer.

Durability: `sync` returns from put() after the transaction holding the write committed with
synchronous=FULL; `async` returns at once and the writer commits within `async_window` seconds
(write-behind; a crash loses at most that window, plus the commit in flight). Creates, deletes and
sweeps always wait for their commit.

What the process holds, newest first:

- `_pending`: records acknowledged by an `async` put and not yet committed, pinned until their
  newest write commits, at most `max_pending_writes` sessions (a put waits for room: backpressure,
  never loss). Every read and every compare-and-set consults them before the cache and the disk.
- `_cache`: clean (committed) records, an LRU bounded by count (`cache_size`) and by bytes
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
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

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
from service.store.record import SQLITE_COLUMNS, SQLITE_FIXED, from_row, sqlite_column, to_row

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
_UPDATE = (f"UPDATE sessions SET {', '.join(f'[{n}]=:{n}' for n in _NAMES if n not in SQLITE_FIXED)} "
           "WHERE tenant=:tenant AND id=:id AND [offset]=:prev_offset")
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


def _store_failed(cause: str) -> Unavailable:
    return Unavailable(f"the sqlite session store failed ({cause}); nothing was applied, retry shortly")


@dataclass(eq=False)
class _Write:
    kind: str  # "create", "put", "delete", "expire"; "sweep" and "probe" name no session
    record: SessionRecord | None
    key: Key
    prev_offset: int = -1
    future: asyncio.Future | None = None  # None: a write-behind, acknowledged before its commit
    at: float = 0.0  # the store's time when queued (expire: the time the record expired at)
    limits: tuple[int, int] = (0, 0)  # create: max_sessions, max_tenant_sessions
    first: bool = True  # sweep: the first transaction of a sweep (it also forgets old tombstones)
    result: int = 0  # sweep: sessions expired


@dataclass
class _Fence:
    cause: str  # the error's class name, for the message (never the path)
    until_stored: bool  # True: the write is retried and the fence lifts once it is stored


class SqliteStore(Store):
    def __init__(self, path: Path, *, durability: str = "sync", cache_size: int = DEFAULT_CAPACITY,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, max_pending_writes: int = DEFAULT_MAX_PENDING_WRITES,
                 async_window: float = 0.05, tombstone_seconds: float = DEFAULT_TOMBSTONE_SECONDS,
                 clock: Clock = time.time, max_pages: int = 0, close_timeout: float = 30.0) -> None:
        self.path, self.durability, self.async_window = path, durability, async_window
        self.tombstone_seconds, self.clock = tombstone_seconds, clock
        self.max_pending_writes = max(1, max_pending_writes)
        self.max_pages = max_pages  # PRAGMA max_page_count (0: SQLite's default); a real limit, for tests
        self.close_timeout = close_timeout
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite", initializer=name_this_thread,
                                        initargs=("recur-sqlite",))
        self._conn: sqlite3.Connection | None = None
        self._cache: OrderedDict[Key, SessionRecord] = OrderedDict()  # clean records only
        self._cache_size, self._cache_bytes = cache_size, cache_bytes
        self._cached_bytes = 0
        self._pending: dict[Key, SessionRecord] = {}  # acknowledged, not yet committed: newest per session
        self._newest: dict[Key, _Write] = {}  # the newest write queued or in flight per session
        self._fenced: dict[Key, _Fence] = {}
        self._queue: list[_Write] = []
        self._retry: list[_Write] = []  # acknowledged write-behinds of a failed batch, retried first
        self._queued_put: dict[Key, _Write] = {}  # write-behinds still in _queue: a newer one joins them
        self._failure: str | None = None  # the cause while the last batch failed
        self._failing_since = 0.0
        self._wake = asyncio.Event()
        self._rush = asyncio.Event()  # someone waits: commit without waiting out the window
        self._committed_event = asyncio.Event()  # set and replaced after each batch
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
            raise _store_failed(e.__class__.__name__) from e

    # -- what the process knows ----------------------------------------------------------------
    def _remember(self, rec: SessionRecord) -> None:
        """Cache a committed record (clean), within the count and byte bounds."""
        key = (rec.tenant, rec.session_id)
        self._forget(key)
        size = rec.nbytes
        if size > self._cache_bytes:
            return
        self._cache[key] = rec
        self._cached_bytes += size
        while self._cache and (len(self._cache) > self._cache_size or self._cached_bytes > self._cache_bytes):
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes

    def _forget(self, key: Key) -> None:
        old = self._cache.pop(key, None)
        if old is not None:
            self._cached_bytes -= old.nbytes

    def _fenced_error(self, key: Key, fence: _Fence) -> Unavailable:
        then = ("it is refused until that write is stored (the store is retrying it); retry shortly"
                if fence.until_stored else
                "it is refused rather than served from an older state (see the server log); delete it and "
                "start again from your own copy of the sequence")
        return Unavailable(f"session {key[1]!r} is fenced: its last acknowledged write could not be stored "
                           f"({fence.cause}); {then}")

    def _check_fence(self, key: Key) -> None:
        fence = self._fenced.get(key)
        if fence is not None:
            raise self._fenced_error(key, fence)

    def _known(self, key: Key) -> SessionRecord | None:
        """The newest acknowledged record without reading the disk, or None when only the disk (or a
        write not yet settled) can tell."""
        w = self._newest.get(key)
        if w is not None and w.future is not None and not w.future.done():
            return None
        if w is not None and w.kind in ("expire", "delete"):
            return None
        return self._pending.get(key) or self._cache.get(key)

    async def _current(self, key: Key) -> SessionRecord:
        """The newest acknowledged record of a session (which may have expired by now); raises when
        it is fenced, expired into a tombstone, or does not exist."""
        while True:
            self._check_fence(key)
            w = self._newest.get(key)
            if w is not None and w.future is not None and not w.future.done():
                await asyncio.wait([w.future])  # a create, delete or sync put in flight: its outcome decides
                continue
            if w is not None and w.kind == "expire":
                raise _expired(key[1], w.at)
            rec = self._pending.get(key)
            if rec is not None:
                return rec
            rec = self._cache.get(key)
            if rec is not None:
                self._cache.move_to_end(key)
                return rec
            row, tomb = await self._run(self._select, key)
            if key in self._newest or key in self._pending or key in self._fenced:
                continue  # written while we read: look again
            if row is None:
                if tomb is not None:
                    raise _expired(key[1], tomb["at"])
                raise SessionNotFound(f"session {key[1]!r} does not exist")
            rec = from_row(row)
            self._remember(rec)
            return rec

    # -- reads ---------------------------------------------------------------------------------
    def _select(self, key: Key) -> tuple[sqlite3.Row | None, sqlite3.Row | None]:
        assert self._conn is not None
        row = self._conn.execute(_SELECT, _key(key)).fetchone()
        tomb = None
        if row is None:
            tomb = self._conn.execute("SELECT at FROM tombstones WHERE tenant=:tenant AND id=:id", _key(key)).fetchone()
        return row, tomb

    def _expire(self, key: Key, rec: SessionRecord) -> SessionExpired:
        """The record has expired: remove this one (behind any write queued for it); sweeping the
        rest is the sweeper's job."""
        self._forget(key)
        self._enqueue(_Write("expire", None, key, at=rec.expires_at))
        return _expired(key[1], rec.expires_at)

    async def get(self, tenant: str, session_id: str) -> SessionRecord:
        key = (tenant, session_id)
        rec = await self._current(key)
        if rec.expires_at <= self.clock():
            raise self._expire(key, rec)
        return rec

    # -- writes --------------------------------------------------------------------------------
    def _enqueue(self, write: _Write) -> None:
        self._queue.append(write)
        if write.kind not in ("sweep", "probe"):
            self._newest[write.key] = write
        if write.future is not None:
            self._rush.set()
        self._idle.clear()
        self._wake.set()

    async def _submit(self, write: _Write) -> None:
        """Queue a write and wait for its commit (even if the caller is cancelled meanwhile)."""
        write.future = asyncio.get_running_loop().create_future()
        self._enqueue(write)
        await settled(write.future)

    async def create(self, record: SessionRecord, *, max_sessions: int = 0, max_tenant_sessions: int = 0) -> None:
        key = (record.tenant, record.session_id)
        self._check_fence(key)
        known = self._known(key)
        if known is not None and known.expires_at > self.clock():
            raise AlreadyExists(f"session {record.session_id!r} already exists")
        # creation is always durable; the limits are checked in its transaction (atomic)
        await self._submit(_Write("create", record, key, at=self.clock(), limits=(max_sessions, max_tenant_sessions)))

    def _check_put(self, key: Key, current: SessionRecord, record: SessionRecord, prev_offset: int) -> None:
        if current.expires_at <= self.clock():
            raise self._expire(key, current)
        if current.offset != prev_offset:
            raise StoreConflict(f"session {record.session_id!r} is at offset {current.offset}", current.offset)

    async def put(self, record: SessionRecord, prev_offset: int) -> None:
        key = (record.tenant, record.session_id)
        if self.durability == "sync" or self._failure is not None:
            # Reply after the commit. While the store fails, write-behind waits for its commit too:
            # each such write probes the store, and nothing is acknowledged that might not be stored.
            self._check_fence(key)
            known = self._known(key)
            if known is not None:
                self._check_put(key, known, record, prev_offset)
            await self._submit(_Write("put", record, key, prev_offset, at=self.clock()))
            return
        while True:
            current = await self._current(key)
            self._check_put(key, current, record, prev_offset)
            if key in self._pending or len(self._pending) < self.max_pending_writes:
                break
            self._rush.set()  # backpressure: wait for the writer to commit, then look again
            await self._next_commit()
            if self._failure is not None:
                return await self.put(record, prev_offset)
        # From the check to the queue without an await: compare-and-set against what is acknowledged.
        self._pending[key] = record
        queued = self._queued_put.get(key)
        if queued is not None and self._newest.get(key) is queued:
            queued.record = record  # one UPDATE from the queued write's prev_offset to the newest record
            return
        w = _Write("put", record, key, prev_offset, at=self.clock())
        self._queued_put[key] = w
        self._enqueue(w)

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
                self._check_fence(key)
                known = self._known(key)
                if known is not None:
                    self._check_put(key, known, record, prev_offset)
            except (StoreConflict, SessionExpired, Unavailable) as e:
                results[k] = e
                continue
            future = loop.create_future()
            self._enqueue(_Write("put", record, key, prev_offset, future, at=self.clock()))
            waiting.append((k, future))
        if waiting:
            outcomes = await settled(asyncio.gather(*(f for _, f in waiting), return_exceptions=True))
            for (k, _), outcome in zip(waiting, outcomes):
                results[k] = outcome if isinstance(outcome, Exception) else None
        return results

    async def delete(self, tenant: str, session_id: str) -> None:
        key = (tenant, session_id)
        await self.get(tenant, session_id)  # fenced, NOT_FOUND or expired before anything changes
        self._forget(key)
        await self._submit(_Write("delete", None, key, at=self.clock()))

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

    def _room(self, c: sqlite3.Connection, w: _Write) -> Exception | None:
        """Inside the create's transaction: is there room under its limits? Counters include sessions
        expired but not yet swept, so at a limit the expired ones go first."""
        max_sessions, max_tenant = w.limits
        for limit, tenant in ((max_tenant, w.key[0]), (max_sessions, None)):
            if limit and self._counted(c, tenant) >= limit:
                self._expire_rows(c, w.at, tenant, _EXPIRE_AT_A_TIME)
                if self._counted(c, tenant) >= limit:
                    return server_limit(limit) if tenant is None else tenant_limit(tenant, limit)
        return None

    def _apply_one(self, c: sqlite3.Connection, w: _Write) -> Exception | None:
        key = _key(w.key)
        if w.kind == "create":
            assert w.record is not None
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
        elif w.kind == "put":
            assert w.record is not None
            if c.execute(_UPDATE, {**to_row(w.record), "prev_offset": w.prev_offset}).rowcount != 1:
                row = c.execute("SELECT [offset] FROM sessions WHERE tenant=:tenant AND id=:id", key).fetchone()
                if row is not None:
                    return StoreConflict(f"session {w.key[1]!r} is at offset {row['offset']}", row["offset"])
                tomb = c.execute("SELECT at FROM tombstones WHERE tenant=:tenant AND id=:id", key).fetchone()
                if tomb is not None:
                    return _expired(w.key[1], tomb["at"])
                return SessionNotFound(f"session {w.key[1]!r} does not exist")
        elif w.kind == "expire":  # only if no later write has renewed it
            if c.execute("DELETE FROM sessions WHERE tenant=:tenant AND id=:id AND expires <= :at",
                         {**key, "at": w.at}).rowcount:
                c.execute("INSERT OR REPLACE INTO tombstones VALUES (:tenant, :id, :at, 'expired')",
                          {**key, "at": w.at})
        elif w.kind == "sweep":
            w.result = self._expire_rows(c, w.at, None, _SWEEP_AT_A_TIME)
            if w.first:
                c.execute("DELETE FROM tombstones WHERE at < ?", (w.at - self.tombstone_seconds,))
        elif w.kind == "probe":  # can the store write? (a page rewritten, nothing changed)
            c.execute("UPDATE session_total SET n = n")
        else:
            c.execute("DELETE FROM sessions WHERE tenant=:tenant AND id=:id", key)
        return None

    def _apply(self, batch: list[_Write]) -> list[Exception | None]:
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
            if not self._queue and not self._retry:
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
            retry, new = self._retry, self._queue
            self._retry, self._queue = [], []
            self._queued_put.clear()
            await self._commit(retry, new)
            backoff = min(1.0, max(0.05, 2 * backoff)) if self._retry else 0.0
            event, self._committed_event = self._committed_event, asyncio.Event()
            event.set()

    async def _commit(self, retry: list[_Write], new: list[_Write]) -> None:
        """Retried writes, then new ones, in one transaction; when that fails, what can go on goes."""
        batch = retry + new
        outcome = await self._attempt(batch)
        waiting = {w.key for w in retry}
        others = [w for w in new if w.key not in waiting]
        if isinstance(outcome, sqlite3.OperationalError) and retry and others:
            # The retried writes may be what cannot be stored (a full disk): the writes of other
            # sessions go alone (a delete among them may be what frees the space). A later write of
            # a retried session stays behind it, in order: alone it would meet the older row.
            alone = await self._attempt(others)
            if not isinstance(alone, Exception):
                self._settle_batch(retry + [w for w in new if w.key in waiting], outcome)
                self._settle_batch(others, alone)
                return
        elif isinstance(outcome, Exception) and not isinstance(outcome, sqlite3.OperationalError) and len(batch) > 1:
            for w in batch:  # one write cannot be stored (never expected): find it, let the others go on
                self._settle_batch([w], await self._attempt([w]))
            return
        self._settle_batch(batch, outcome)

    async def _attempt(self, batch: list[_Write]) -> list[Exception | None] | Exception:
        """Apply a batch in one transaction: a result per write, or why none was applied."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._exec, self._apply, batch)
        except Exception as e:
            return e

    def _settle_batch(self, batch: list[_Write], outcome: list[Exception | None] | Exception) -> None:
        if isinstance(outcome, sqlite3.OperationalError):  # the store cannot write now: retry write-behinds
            self._batch_failed(batch, outcome.__class__.__name__, str(outcome), transient=True)
        elif isinstance(outcome, Exception):  # anything else will not get better by retrying
            log.error("sqlite session store: a batch of %d writes failed", len(batch), exc_info=outcome)
            self._batch_failed(batch, outcome.__class__.__name__, str(outcome), transient=False)
        else:
            self._batch_committed(batch, outcome)

    def _settle(self, w: _Write, error: Exception | None) -> None:
        if self._newest.get(w.key) is w:
            del self._newest[w.key]
        if w.future is not None and not w.future.done():
            if error is None:
                w.future.set_result(None)
            else:
                w.future.set_exception(error)

    def _batch_failed(self, batch: list[_Write], cause: str, detail: str, transient: bool) -> None:
        behind = [w for w in batch if w.future is None]
        if self._failure is None:
            self._failing_since = time.monotonic()
            log.error("the sqlite session store failed (%s: %s): %d writes refused, %d acknowledged writes %s",
                      cause, detail, len(batch) - len(behind), len(behind),
                      "kept and retried, their sessions fenced until stored" if transient else "lost: sessions fenced")
        self._failure = cause
        for w in batch:
            if w.future is None:
                if transient:
                    self._retry.append(w)
                    self._fenced[w.key] = _Fence(cause, until_stored=True)
                else:
                    self._fence(w, cause)
            else:
                self._settle(w, _store_failed(cause))

    def _fence(self, w: _Write, cause: str) -> None:
        """An acknowledged write can never be stored: refuse its session rather than serve an older state."""
        self._fenced[w.key] = _Fence(cause, until_stored=False)
        self._forget(w.key)
        if w.record is not None and self._pending.get(w.key) is w.record:
            del self._pending[w.key]
        offset = -1 if w.record is None else w.record.offset
        log.error("a session is fenced: its acknowledged write (offset %d) could not be stored (%s); "
                  "calls on it answer UNAVAILABLE", offset, cause, extra={"session": w.key[1], "tenant": w.key[0]})
        self._settle(w, None)

    def _batch_committed(self, batch: list[_Write], results: list[Exception | None]) -> None:
        self.commits += 1
        self.events.group_commit(len(batch))
        if self._failure is not None and not self._retry:
            log.warning("the sqlite session store writes again after %.1f s", time.monotonic() - self._failing_since)
            self._failure = None
        for w, err in zip(batch, results):
            if w.future is None and err is not None:
                self._fence(w, err.__class__.__name__)
                continue
            if err is None and w.kind in ("create", "put"):
                assert w.record is not None
                self._remember(w.record)  # here, not in put(): a cancelled caller must not skip it
            elif err is None and w.kind in ("delete", "expire"):
                self._forget(w.key)
            elif err is not None:
                self._forget(w.key)  # never serve a state that was not stored
            elif w.kind == "sweep" and w.first:
                for key in [k for k, r in self._cache.items() if r.expires_at <= w.at]:
                    self._forget(key)
            if w.future is None:
                if w.record is not None and self._pending.get(w.key) is w.record:
                    del self._pending[w.key]
                fence = self._fenced.get(w.key)
                if fence is not None and fence.until_stored:
                    del self._fenced[w.key]
            self._settle(w, err)

    def write_lag(self) -> float:
        """Seconds the oldest acknowledged write-behind still queued has waited (0: none); callable
        from another thread (a metrics scrape): it only copies the lists."""
        waiting = [w.at for w in list(self._retry) + list(self._queue) if w.future is None and w.kind == "put"]
        return max(0.0, self.clock() - min(waiting)) if waiting else 0.0

    async def flush(self) -> None:
        """Wait until every accepted write is stored (while the store fails, until it recovers)."""
        while self._queue or self._retry or not self._idle.is_set():
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
        n, expired, n_expired = await self._run(self._count_sync, tenant, t, bool(self._pending))
        renewed = sum(1 for k in expired if (r := self._pending.get(k)) is not None and r.expires_at > t)
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
            pending = self._pending.get((tenant, row["id"]))
            out.append(SessionSummary.of(pending) if pending is not None else
                       SessionSummary(**{name: row[column] for name, column in _SUMMARY}))
        return out

    def _read_probe(self) -> None:
        assert self._conn is not None
        self._conn.execute("SELECT n FROM session_total").fetchone()

    async def ping(self) -> None:
        if self._failure is not None:
            if self._retry:
                raise Unavailable(f"the sqlite session store is failing ({self._failure}): {len(self._retry)} "
                                  "acknowledged writes wait to be stored and are retried")
            await self._submit(_Write("probe", None, ("", ""), at=self.clock()))  # raises while it still fails
            return
        await self._run(self._read_probe)

    async def sweep(self) -> int:
        """Expire what is due at `clock()`, a few thousand rows a transaction (writes go between)."""
        t, n = self.clock(), 0
        while True:
            w = _Write("sweep", None, ("", ""), at=t, first=n == 0)
            await self._submit(w)
            n += w.result
            if w.result < _SWEEP_AT_A_TIME:
                return n

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.flush(), self.close_timeout)
        except TimeoutError:
            log.error("closing the sqlite session store with %d acknowledged writes not stored: the store kept "
                      "failing (%s) for %.0f s", len(self._pending), self._failure, self.close_timeout)
        if self._writer is not None:
            self._writer.cancel()
        if self._conn is not None:
            await self._run(self._conn.close)
        self._exec.shutdown(wait=True)
