"""The SQLite store's write queue and fencing: what the process knows about the file, as a unit of its own.

SqliteStore (service/store/sqlite.py) owns the connection, the SQL and the writer's timing; everything it
holds in memory between the callers and the file is here, with its rules written as `check()`:

- the writes queued for the next transaction, in arrival order, one typed write per kind (Create, Put,
  PutRows, Delete, Expire, Sweep, Probe); a Put or an Expire without a future is acknowledged before its
  commit (a write-behind: nobody waits for it);
- `pending`: the newest record each write-behind Put acknowledged, pinned until it is stored;
- the newest write queued or in flight per session, whose outcome a read must wait for;
- write-behinds of a failed transaction, retried first, and the sessions they fence;
- the cache of clean (committed) records, kept as rows of a session table (service/store/table.py, so
  the chunk pipeline's row round reads them in place), an LRU bounded in records and bytes.

`commit(attempt)` runs one turn of the writer: the retried writes, then the new ones, in one transaction
(`attempt` runs it; tests give a fake one), and settles each write by its outcome.

With `checking` on (RECUR_CHECK_INVARIANTS=1; the test suite sets it) every operation ends with `check()`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import assert_never

import numpy as np

from service.errors import Unavailable
from service.store.record import SessionRecord
from service.store.table import Loc, RowCache, RowWrite

log = logging.getLogger("service.store.sqlite")  # its lines are the SQLite store's, as they always were

Key = tuple[str, str]
CHECK_VARIABLE = "RECUR_CHECK_INVARIANTS"  # "1": every WriteQueue checks its invariants after each operation


@dataclass(eq=False)
class Create:
    """A new session; its limits are checked in its transaction."""

    key: Key
    record: SessionRecord
    at: float  # the store's time when queued
    limits: tuple[int, int] = (0, 0)  # max_sessions, max_tenant_sessions
    future: asyncio.Future[None] | None = None


@dataclass(eq=False)
class Put:
    """A compare-and-set from `prev_offset` to `record`. Without a future it is a write-behind: a newer
    write-behind of the session joins it while it is queued (its record replaced, its prev_offset kept)."""

    key: Key
    record: SessionRecord
    prev_offset: int
    at: float
    future: asyncio.Future[None] | None = None


@dataclass(eq=False)
class PutRows:
    """The chunk pipeline's batched write of cached rows: row j by compare-and-set from `write.offsets[j]`.
    Always waited for; the transaction sets `results`, one per row."""

    keys: list[Key]
    write: RowWrite
    at: float
    future: asyncio.Future[None] | None = None
    results: list[Exception | None] = field(default_factory=list)


@dataclass(eq=False)
class Delete:
    key: Key
    at: float
    future: asyncio.Future[None] | None = None


@dataclass(eq=False)
class Expire:
    """Remove a session a read found expired (unless a later write renewed it); nobody waits for it."""

    key: Key
    at: float  # the time the record expired at
    future: None = None


@dataclass(eq=False)
class Sweep:
    """One transaction of a sweep: up to a few thousand expired rows."""

    at: float
    first: bool = True  # the first transaction of a sweep (it also forgets old tombstones)
    result: int = 0  # sessions expired
    future: asyncio.Future[None] | None = None


@dataclass(eq=False)
class Probe:
    """Can the store write? (a page rewritten, nothing changed)"""

    at: float
    future: asyncio.Future[None] | None = None


SessionWrite = Create | Put | PutRows | Delete | Expire
Write = SessionWrite | Sweep | Probe
Behind = Put | Expire  # the kinds that may be acknowledged before their commit


@dataclass
class Fence:
    cause: str  # the error's class name, for the message (never the path)
    until_stored: bool  # True: the write is retried and the fence lifts once it is stored


@dataclass
class Failed:
    """Why a transaction applied nothing. `transient`: the store cannot write for now (read-only, disk full,
    I/O error): write-behinds are kept and retried; otherwise retrying will not help."""

    error: Exception
    transient: bool


Outcome = list[Exception | None] | Failed  # a result per write, in order, or why none was applied
Attempt = Callable[[list[Write]], Awaitable[Outcome]]


def behind(w: Write) -> bool:
    """Acknowledged before its commit: nobody waits for its outcome."""
    return w.future is None


def store_failed(cause: str) -> Unavailable:
    return Unavailable(f"the sqlite session store failed ({cause}); nothing was applied, retry shortly")


def fenced_error(key: Key, fence: Fence) -> Unavailable:
    then = ("it is refused until that write is stored (the store is retrying it); retry shortly"
            if fence.until_stored else
            "it is refused rather than served from an older state (see the server log); delete it and "
            "start again from your own copy of the sequence")
    return Unavailable(f"session {key[1]!r} is fenced: its last acknowledged write could not be stored "
                       f"({fence.cause}); {then}")


def checking_by_default() -> bool:
    return __debug__ and os.environ.get(CHECK_VARIABLE) == "1"


class WriteQueue:
    """The SQLite store's writes between the callers and the file, and what it knows of the file (see the
    module's docstring). Synchronous but for `commit`; used on the event loop only."""

    def __init__(self, *, cache_size: int, cache_bytes: int, max_pending: int,
                 on_commit: Callable[[int], None] = lambda writes: None, checking: bool | None = None) -> None:
        self.cache_size, self.cache_bytes, self.max_pending = cache_size, cache_bytes, max(1, max_pending)
        self.on_commit = on_commit  # called with the number of writes of each committed transaction
        self.checking = checking_by_default() if checking is None else checking
        self._cache = RowCache()  # clean records only
        self._pending: dict[Key, SessionRecord] = {}  # acknowledged, not yet committed: newest per session
        self._newest: dict[Key, SessionWrite] = {}  # the newest write queued or in flight per session
        self._fenced: dict[Key, Fence] = {}
        self._queue: list[Write] = []
        self._retry: list[Behind] = []  # acknowledged write-behinds of a failed batch, retried first
        self._queued_put: dict[Key, Put] = {}  # write-behinds still in _queue: a newer one joins them
        self._in_flight: list[Write] = []  # taken by commit, not settled yet
        self.failure: str | None = None  # the cause while the last batch failed
        self._failing_since = 0.0

    # -- what a caller may ask ---------------------------------------------------------------------------
    def check_fence(self, key: Key) -> None:
        """Raise Unavailable when the session is fenced."""
        fence = self._fenced.get(key)
        if fence is not None:
            raise fenced_error(key, fence)

    def is_fenced(self, key: Key) -> bool:
        return key in self._fenced

    @property
    def fenced_count(self) -> int:
        return len(self._fenced)

    def known(self, key: Key) -> SessionRecord | None:
        """The newest acknowledged record without reading the disk, or None when only the disk (or a
        write not yet settled) can tell."""
        w = self._newest.get(key)
        if w is not None and w.future is not None and not w.future.done():
            return None
        if isinstance(w, Expire | Delete):
            return None
        return self._pending.get(key) or self._cache.get(key)

    def clean_row(self, key: Key) -> Loc | None:
        """The session's cached row when nothing is queued, pending or fenced for it (the row is then
        what the file holds); None otherwise."""
        if key in self._newest or key in self._pending or key in self._fenced:
            return None
        return self._cache.loc(key)

    def unsettled(self, key: Key) -> asyncio.Future[None] | None:
        """The future of the session's newest write while it is not settled (its outcome decides what a
        read answers)."""
        w = self._newest.get(key)
        return w.future if w is not None and w.future is not None and not w.future.done() else None

    def expiring(self, key: Key) -> float | None:
        """When the session's newest write removes it as expired: the time it expired at."""
        w = self._newest.get(key)
        return w.at if isinstance(w, Expire) else None

    def acknowledged(self, key: Key) -> SessionRecord | None:
        """The session's newest acknowledged record held in process (pending, else cached), or None."""
        rec = self._pending.get(key)
        if rec is not None:
            return rec
        return self._cache.get(key)

    def touched(self, key: Key) -> bool:
        """Whether anything is queued, pending or fenced for the session (a disk read may be stale)."""
        return key in self._newest or key in self._pending or key in self._fenced

    def pending_record(self, key: Key) -> SessionRecord | None:
        return self._pending.get(key)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def cached_count(self) -> int:
        return len(self._cache)

    @property
    def cached_bytes(self) -> int:
        return self._cache.nbytes

    def has_room(self, key: Key) -> bool:
        """Whether a write-behind of the session may be acknowledged now (else: backpressure)."""
        return key in self._pending or len(self._pending) < self.max_pending

    def empty(self) -> bool:
        """Nothing queued and nothing to retry (a transaction may still be in flight)."""
        return not self._queue and not self._retry

    @property
    def retrying(self) -> int:
        return len(self._retry)

    def write_lag(self, now: float) -> float:
        """Seconds the oldest write-behind Put still queued has waited (0: none); callable from another
        thread (a metrics scrape): it only copies the lists."""
        waiting = [w.at for w in list(self._retry) + list(self._queue) if isinstance(w, Put) and behind(w)]
        return max(0.0, now - min(waiting)) if waiting else 0.0

    # -- the cache ---------------------------------------------------------------------------------------
    def remember(self, rec: SessionRecord) -> None:
        """Cache a committed record (clean), within the count and byte bounds."""
        self._remember(rec)
        self._checked()

    def _remember(self, rec: SessionRecord) -> None:
        self._forget((rec.tenant, rec.session_id))
        if rec.nbytes > self.cache_bytes or self.cache_size <= 0:
            return
        self._cache.put(rec)
        self._bound()

    def _bound(self) -> None:
        while len(self._cache) and (len(self._cache) > self.cache_size or self._cache.nbytes > self.cache_bytes):
            self._cache.pop_oldest()

    def forget(self, key: Key) -> None:
        self._forget(key)
        self._checked()

    def _forget(self, key: Key) -> None:
        self._cache.pop(key)

    # -- queueing ------------------------------------------------------------------------------------------
    def enqueue(self, w: Write) -> None:
        """Queue a write for the next transaction, behind everything queued before it."""
        self._queue.append(w)
        if not isinstance(w, Sweep | Probe):
            for key in _keys_of(w):
                self._newest[key] = w
        self._checked()

    def acknowledge(self, record: SessionRecord, prev_offset: int, at: float) -> Put | None:
        """A write-behind: `record` is pending from now on. It joins the session's write-behind still queued
        (one UPDATE from that one's prev_offset to the newest record), else a new Put is queued and returned.
        The caller checked the compare-and-set against `known`/`acknowledged` without an await since."""
        key = (record.tenant, record.session_id)
        self._pending[key] = record
        queued = self._queued_put.get(key)
        if queued is not None and self._newest.get(key) is queued:
            queued.record = record
            self._checked()
            return None
        w = Put(key, record, prev_offset, at)
        self._queued_put[key] = w
        self.enqueue(w)
        return w

    def take(self) -> tuple[list[Behind], list[Write]]:
        """The next transaction's writes: the retried ones, then the new ones, in order."""
        retry, new = self._retry, self._queue
        self._retry, self._queue = [], []
        self._queued_put.clear()
        self._in_flight = [*retry, *new]
        self._checked()
        return retry, new

    # -- the writer's turn ---------------------------------------------------------------------------------
    async def commit(self, retry: list[Behind], new: list[Write], attempt: Attempt) -> None:
        """Retried writes, then new ones (what `take` gave), in one transaction; when that fails, what can
        go on goes. Every write taken is settled when it returns: stored, retried, fenced or refused."""
        await self._commit(retry, new, attempt)
        if self.checking:
            assert not self._in_flight, "a write taken for a transaction was not settled"

    async def _commit(self, retry: list[Behind], new: list[Write], attempt: Attempt) -> None:
        batch: list[Write] = [*retry, *new]
        outcome = await attempt(batch)
        waiting = {w.key for w in retry}
        others = [w for w in new if waiting.isdisjoint(_keys_of(w))]
        if isinstance(outcome, Failed) and outcome.transient and retry and others:
            # The retried writes may be what cannot be stored (a full disk): the writes of other
            # sessions go alone (a delete among them may be what frees the space). A later write of
            # a retried session stays behind it, in order: alone it would meet the older row.
            alone = await attempt(others)
            if not isinstance(alone, Failed):
                self._settle_batch([*retry, *(w for w in new if not waiting.isdisjoint(_keys_of(w)))], outcome)
                self._settle_batch(others, alone)
                return
        elif isinstance(outcome, Failed) and not outcome.transient and len(batch) > 1:
            for w in batch:  # one write cannot be stored (never expected): find it, let the others go on
                self._settle_batch([w], await attempt([w]))
            return
        self._settle_batch(batch, outcome)

    def _settle_batch(self, batch: list[Write], outcome: Outcome) -> None:
        if isinstance(outcome, Failed):
            error = outcome.error
            if not outcome.transient:  # anything else will not get better by retrying
                log.error("sqlite session store: a batch of %d writes failed", len(batch), exc_info=error)
            self._batch_failed(batch, error.__class__.__name__, str(error), outcome.transient)
        else:
            self._batch_committed(batch, outcome)
        settled = {id(w) for w in batch}
        self._in_flight = [w for w in self._in_flight if id(w) not in settled]
        self._checked()

    def _settle(self, w: Write, error: Exception | None) -> None:
        for key in _keys_of(w):
            if self._newest.get(key) is w:
                del self._newest[key]
        if w.future is not None and not w.future.done():
            if error is None:
                w.future.set_result(None)
            else:
                w.future.set_exception(error)

    def _batch_failed(self, batch: list[Write], cause: str, detail: str, transient: bool) -> None:
        behinds = [w for w in batch if isinstance(w, Put | Expire) and behind(w)]
        if self.failure is None:
            self._failing_since = time.monotonic()
            log.error("the sqlite session store failed (%s: %s): %d writes refused, %d acknowledged writes %s",
                      cause, detail, len(batch) - len(behinds), len(behinds),
                      "kept and retried, their sessions fenced until stored" if transient else "lost: sessions fenced")
        self.failure = cause
        for w in batch:
            if isinstance(w, Put | Expire) and behind(w):
                if transient:
                    self._retry.append(w)
                    self._fenced[w.key] = Fence(cause, until_stored=True)
                else:
                    self._fence(w, cause)
            else:
                self._settle(w, store_failed(cause))

    def _fence(self, w: Behind, cause: str) -> None:
        """An acknowledged write can never be stored: refuse its session rather than serve an older state."""
        self._fenced[w.key] = Fence(cause, until_stored=False)
        self._forget(w.key)
        if isinstance(w, Put) and self._pending.get(w.key) is w.record:
            del self._pending[w.key]
        offset = w.record.offset if isinstance(w, Put) else -1
        log.error("a session is fenced: its acknowledged write (offset %d) could not be stored (%s); "
                  "calls on it answer UNAVAILABLE", offset, cause, extra={"session": w.key[1], "tenant": w.key[0]})
        self._settle(w, None)

    def _batch_committed(self, batch: list[Write], results: list[Exception | None]) -> None:
        self.on_commit(len(batch))
        if self.failure is not None and not self._retry:
            log.warning("the sqlite session store writes again after %.1f s", time.monotonic() - self._failing_since)
            self.failure = None
        for w, err in zip(batch, results):
            if isinstance(w, Put | Expire) and behind(w):
                if err is not None:
                    self._fence(w, err.__class__.__name__)
                    continue
                if isinstance(w, Put) and self._pending.get(w.key) is w.record:
                    del self._pending[w.key]
                fence = self._fenced.get(w.key)
                if fence is not None and fence.until_stored:
                    del self._fenced[w.key]
            self._committed(w, err)
            self._settle(w, err)

    def _committed(self, w: Write, err: Exception | None) -> None:
        """What a stored write (or its refusal) means for the cache."""
        match w:
            case Create() | Put():
                if err is None:
                    self._remember(w.record)  # here, not in put(): a cancelled caller must not skip it
                else:
                    self._forget(w.key)  # never serve a state that was not stored
            case PutRows():
                refused = [key for key, e in zip(w.keys, w.results) if e is not None] if err is None else w.keys
                for key in refused:
                    self._forget(key)  # never serve a state that was not stored
                if err is None:
                    self._cache.commit(w.write.only(np.array([e is None for e in w.results], bool)))
                    self._bound()
            case Delete() | Expire():
                self._forget(w.key)
            case Sweep():
                if err is None and w.first:
                    for key in self._cache.expired(w.at):
                        self._forget(key)
            case Probe():
                pass
            case _:
                assert_never(w)

    # -- the rules -----------------------------------------------------------------------------------------
    def _checked(self) -> None:
        if self.checking:
            self.check()

    def check(self) -> None:
        """Assert every invariant of the queue (see each message); O(writes + records held)."""
        order: list[Write] = [*self._in_flight, *self._retry, *self._queue]  # the order they will be stored in
        ids = {id(w) for w in order}
        assert len(ids) == len(order), "a write is queued twice"
        assert not self._retry or self.failure is not None, "writes wait to be retried while the store is not failing"
        for r in self._retry:
            assert behind(r), "only acknowledged write-behinds are retried: a waiting caller was answered instead"
        for w in order:
            assert w.future is None or not w.future.done(), "a write still queued has a settled future"
        self._check_sessions(order)
        self._check_cache()

    def _check_sessions(self, order: list[Write]) -> None:
        last: dict[Key, SessionWrite] = {}  # each session's last write in storing order
        last_behind: dict[Key, Put] = {}  # and its last write-behind Put
        for w in order:
            if isinstance(w, Sweep | Probe):
                continue
            for key in _keys_of(w):
                last[key] = w
            if isinstance(w, Put) and behind(w):
                last_behind[w.key] = w
        ids = {id(w) for w in order}
        for key, w in self._newest.items():
            assert (isinstance(w, PutRows) or w.key == key) and id(w) in ids, \
                "the newest write of a session is not queued or in flight"
        for key, w in last.items():
            assert key in self._fenced or self._newest.get(key) is w, \
                "a session's newest write is not the last one queued for it (and the session is not fenced)"
        assert len(self._pending) <= self.max_pending, "more sessions pending than max_pending_writes"
        for key, rec in self._pending.items():
            put = last_behind.get(key)
            assert put is not None and put.record is rec, \
                "a pending record is not the record of the session's last write-behind still to be stored"
        for key in last_behind:
            assert key in self._pending, "an acknowledged write-behind is not pending: a read could miss it"
        queued = {id(w) for w in self._queue}
        for key, put in self._queued_put.items():
            assert put.key == key and behind(put) and id(put) in queued, \
                "a coalescing target is not a queued write-behind"
        assert len({id(w) for w in self._queue if isinstance(w, Put) and behind(w)}) == len(self._queued_put), \
            "a queued write-behind is not the one newer write-behinds of its session join"
        for key, fence in self._fenced.items():
            assert fence.cause, "a fence without its cause"
            if fence.until_stored:
                assert any(isinstance(w, Put | Expire) and behind(w) and w.key == key
                           for w in [*self._in_flight, *self._retry]), \
                    "a session is fenced until a write is stored, and no such write is being retried"

    def _check_cache(self) -> None:
        self._cache.check()
        assert len(self._cache) <= max(0, self.cache_size) and self._cache.nbytes <= self.cache_bytes, \
            "the cache is over its bounds"


def _keys_of(w: Write) -> tuple[Key, ...] | list[Key]:
    """The sessions a write is about."""
    if isinstance(w, Sweep | Probe):
        return ()
    return w.keys if isinstance(w, PutRows) else (w.key,)
